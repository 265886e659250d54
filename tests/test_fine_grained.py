"""Fine-grained ZS-SBIR (issue 17): instance_accuracy against a float64 brute-force reference,
the Sketchy instance pairing on a tree built from the real lists, the FG loss terms against
hand-computed values, the patch shuffle, and the synthetic_fg path end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsbir.eval.metrics import instance_accuracy

# ----------------------------------------------------------------------------- instance_accuracy


def reference_accuracy(queries, q_inst, gallery, g_inst, q_group=None, g_group=None, ks=(1, 5)) -> dict:
    """Per query: sort the allowed gallery items by (-cosine, gallery index) in float64 and find the match."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        scores = g @ q[i]
        allowed = [j for j in range(len(g)) if q_group is None or g_group[j] == q_group[i]]
        ranked = sorted(allowed, key=lambda j: (-scores[j], j))
        ranks.append(1 + [g_inst[j] for j in ranked].index(q_inst[i]))
    return {f"acc_{k}": float(np.mean(np.asarray(ranks) <= k)) for k in ks}


def tied_case(seed: int, n_gallery: int = 40, n_queries: int = 60, groups: int = 4):
    """Random instance-retrieval data with many exact ties: embeddings repeat a few random vectors
    (equal vectors score exactly equal; distinct ones are far apart even in float32)."""
    rng = np.random.default_rng(seed)
    palette = rng.normal(size=(6, 5))
    gallery = palette[rng.integers(0, len(palette), n_gallery)]
    queries = palette[rng.integers(0, len(palette), n_queries)]
    g_inst = rng.permutation(1000)[:n_gallery]  # arbitrary, unordered ids
    g_group = rng.integers(0, groups, n_gallery)
    match = rng.integers(0, n_gallery, n_queries)
    return queries, g_inst[match], gallery, g_inst, g_group[match], g_group


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grouped", [False, True])
def test_instance_accuracy_matches_bruteforce_reference_with_ties(seed, grouped):
    queries, q_inst, gallery, g_inst, q_group, g_group = tied_case(seed)
    groups = (q_group, g_group) if grouped else (None, None)
    expected = reference_accuracy(queries, q_inst, gallery, g_inst, *groups, ks=(1, 3, 5))
    for dtype in (np.float64, np.float32):
        got = instance_accuracy(queries.astype(dtype), q_inst, gallery.astype(dtype), g_inst, *groups,
                                ks=(1, 3, 5), chunk_size=7)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (key, dtype)
        assert got["n_queries"] == len(queries) and got["n_gallery"] == len(gallery)


def test_instance_accuracy_ties_go_to_the_lower_gallery_index():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0], [1.0, 0.0]])
    # query 0's match is item 0 (wins the tie: rank 1); query 1's is item 1 (loses it: rank 2)
    got = instance_accuracy(queries, [10, 11], gallery, [10, 11, 12], ks=(1, 2))
    assert got["acc_1"] == 0.5 and got["acc_2"] == 1.0


def test_instance_accuracy_groups_restrict_the_competitors():
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    queries = np.array([[0.95, 0.05]])  # closest: item 0, then item 1 (its match)
    ungrouped = instance_accuracy(queries, [1], gallery, [0, 1, 2], ks=(1,))
    grouped = instance_accuracy(queries, [1], gallery, [0, 1, 2], [7], [3, 7, 7], ks=(1,))
    assert ungrouped["acc_1"] == 0.0 and grouped["acc_1"] == 1.0


@pytest.mark.parametrize("problem, args, message", [
    ("missing", ([5], [0, 1]), "no true match"),
    ("repeated", ([0], [0, 0]), "more than once"),
])
def test_instance_accuracy_rejects_bad_instances(problem, args, message):
    q_inst, g_inst = args
    with pytest.raises(ValueError, match=message):
        instance_accuracy(np.ones((1, 2)), q_inst, np.eye(2), g_inst)


def test_instance_accuracy_rejects_a_match_in_another_group():
    with pytest.raises(ValueError, match="another group"):
        instance_accuracy(np.ones((1, 2)), [1], np.eye(2), [0, 1], [0], [0, 1])


# ----------------------------------------------------------------------------- Sketchy pairing

def fg_tree(shared_splits, data_dir, photos_per_class: int = 2):
    """A tiny Sketchy split-2 tree from the real lists, in their order: per class the first
    `photos_per_class` photos of the sketched folder with ALL their sketches, two
    EXTEND_image_sketchy_ready photos, and one sketched-folder photo whose sketches are left out."""
    from datatree import split_line, write_image

    source, root = shared_splits / "Sketchy" / "zeroshot0", data_dir / "Sketchy"
    split = root / "zeroshot0"
    split.mkdir(parents=True)
    for name in ("cname_cid.txt", "cname_cid_zero.txt"):
        (split / name).write_text((source / name).read_text())
    unsketched = set()
    for part in ("train", "zero"):
        photos = [split_line(x) for x in (source / f"all_photo_filelist_{part}.txt").read_text().splitlines()]
        sketches = [split_line(x) for x in
                    (source / f"sketch_tx_000000000000_ready_filelist_{part}.txt").read_text().splitlines()]
        kept, extend, spare = {}, {}, {}
        for path, label in photos:
            bucket = kept if "/photo/" in path else extend
            if len(bucket.setdefault(label, [])) < photos_per_class:
                bucket[label].append(path)
            elif "/photo/" in path and label not in spare:
                spare[label] = path
        chosen = {p for paths in (*kept.values(), *extend.values()) for p in paths} | set(spare.values())
        unsketched |= set(spare.values())
        stems = {(p.split("/")[-2], p.rsplit("/", 1)[1].rsplit(".", 1)[0]) for paths in kept.values() for p in paths}
        sketch_lines = [(p, c) for p, c in sketches
                        if (p.split("/")[-2], p.rsplit("/", 1)[1].rsplit(".", 1)[0].rsplit("-", 1)[0]) in stems]
        photo_lines = [(p, c) for p, c in photos if p in chosen]
        (split / f"all_photo_filelist_{part}.txt").write_text("".join(f"{p} {c}\n" for p, c in photo_lines))
        (split / f"sketch_tx_000000000000_ready_filelist_{part}.txt").write_text(
            "".join(f"{p} {c}\n" for p, c in sketch_lines))
        for i, (path, _) in enumerate(photo_lines + sketch_lines):
            write_image(root / path, "sketch" if "/sketch/" in path else "photo", seed=i)
    return unsketched


def test_sketchy_pairing_on_a_tree_from_the_real_lists(compose_cfg, shared_splits, tmp_path, caplog):
    from zsbir.data.datamodule import load_split
    from zsbir.data.instances import sketch_photo_index

    unsketched = fg_tree(shared_splits, tmp_path / "data")
    cfg = compose_cfg("data=sketchy_fg", f"paths.data_dir={tmp_path / 'data'}", "data.counts=null",
                      "data.fine_grained.counts=null", "data.num_workers=0").data
    with caplog.at_level("INFO"):
        data = load_split(cfg)
    for sketches, photos in ((data.train_sketch, data.train_photo), (data.val_sketch, data.train_photo),
                             (data.zero_sketch, data.zero_photo)):
        photo_of = sketch_photo_index(sketches, photos)
        for i, path in enumerate(sketches.paths):  # exactly one photo, of the sketch's class, drawn from it
            photo = photos.paths[photo_of[i]]
            assert photos.labels[photo_of[i]] == sketches.labels[i]
            assert photo.replace("/photo/", "/sketch/").rsplit(".", 1)[0] == path.rsplit("-", 1)[0]
            assert sum(p.rsplit(".", 1)[0] == photo.rsplit(".", 1)[0] for p in photos.paths) == 1
    gallery = data.train_photo.paths + data.zero_photo.paths
    assert not any("EXTEND_image_sketchy_ready" in p for p in gallery)  # no sketches: not in the FG gallery
    assert not unsketched & set(gallery)
    assert len(data.zero_photo) == 2 * 21 and len(data.train_photo) == 2 * 104
    assert "have no sketch and are not in the fine-grained gallery" in caplog.text  # the spare photos, logged
    assert "sketch <class>/<stem>-<n>.* was drawn from photo <class>/<stem>.*" in caplog.text  # the rule


def test_real_sketchy_lists_pair_to_the_documented_instance_counts(compose_cfg, shared_splits):
    from zsbir.data.filelist import read_filelist
    from zsbir.data.instances import restrict_to_instances

    cfg = compose_cfg("data=sketchy_fg").data
    split = shared_splits / "Sketchy" / "zeroshot0"
    lists = {key: read_filelist(split / name) for key, name in cfg.lists.items() if name}
    out = restrict_to_instances(lists, cfg.fine_grained, "sketchy_fg")  # raises on any unpaired sketch
    assert (len(out["train_photo"]), len(out["zero_photo"])) == (10400, 2100) == (
        cfg.fine_grained.counts.train_photo, cfg.fine_grained.counts.zero_photo)


def test_a_sketch_without_its_photo_is_named(tmp_path):
    from zsbir.data.filelist import DatasetError, FileList
    from zsbir.data.instances import sketch_photo_index

    photos = FileList(["photo/x/cat/a_1.jpg"], [0], "photos.txt")
    sketches = FileList(["sketch/x/cat/a_1-1.png", "sketch/x/cat/b_2-3.png"], [0, 0], "sketches.txt")
    with pytest.raises(DatasetError, match=r"1 of 2 sketches of sketches.txt have no photo.*b_2-3.png"):
        sketch_photo_index(sketches, photos)


# ----------------------------------------------------------------------------- loss terms

def out(vectors) -> dict:
    return {"embedding": torch.tensor(vectors, dtype=torch.float32)}


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_relative_distance_regulariser_hand_computed():
    from zsbir.losses.fine_grained import RelativeDistanceRegulariser

    # cosine distances, delta = d(s, p+) - d(s, p-):
    # category 0: (0 - 1) = -1, (1 - 1) = 0;  category 1: (0 - 2) = -2, (1 - 1) = 0
    outputs = {"sketch": out([[1, 0]] * 4), "photo_pos": out([[1, 0], [0, 1], [1, 0], [0, 1]]),
               "photo_neg": out([[0, 1], [0, 1], [-1, 0], [0, 1]])}
    batch = {"label": torch.tensor([0, 0, 1, 1])}
    d0, d1 = _softmax([-1, 0]), _softmax([-2, 0])
    expected = (_kl(d0, d1) + _kl(d1, d0)) / 2
    assert expected == pytest.approx(0.07487, abs=1e-5)
    assert float(RelativeDistanceRegulariser()(batch, outputs, None)) == pytest.approx(expected, abs=1e-6)
    # the temperature divides delta before the softmax
    d0, d1 = _softmax([-0.5, 0]), _softmax([-1, 0])
    value = RelativeDistanceRegulariser(temperature=2.0)(batch, outputs, None)
    assert float(value) == pytest.approx((_kl(d0, d1) + _kl(d1, d0)) / 2, abs=1e-6)
    # the same distribution in every category (here shifted by a constant): nothing to regularise
    outputs["photo_pos"] = out([[1, 0], [0, 1], [0, 1], [-1, 0]])  # delta = -1, 0 | 0, 1
    outputs["photo_neg"] = out([[0, 1], [0, 1], [0, 1], [0, 1]])
    assert float(RelativeDistanceRegulariser()(batch, outputs, None)) == pytest.approx(0.0, abs=1e-7)
    single = RelativeDistanceRegulariser()({"label": torch.tensor([4, 4, 4, 4])}, outputs, None)
    assert float(single) == 0.0


def test_relative_distance_regulariser_matches_a_loop_over_category_pairs():
    """Labels interleaved and counts unequal: each category's first N triplets in batch order."""
    from zsbir.losses.fine_grained import RelativeDistanceRegulariser

    g = torch.Generator().manual_seed(3)
    labels = [2, 0, 1, 2, 0, 1, 1, 2, 0, 2]  # category 2 has 4 triplets, the others 3: N = 3
    sketch, pos, neg = (torch.randn(len(labels), 5, generator=g, dtype=torch.float64) for _ in range(3))
    outputs = {"sketch": {"embedding": sketch}, "photo_pos": {"embedding": pos}, "photo_neg": {"embedding": neg}}
    value = RelativeDistanceRegulariser()({"label": torch.tensor(labels)}, outputs, None)

    cos = torch.nn.functional.cosine_similarity
    delta = ((1 - cos(sketch, pos)) - (1 - cos(sketch, neg))).tolist()
    dists = {c: _softmax([delta[i] for i, l in enumerate(labels) if l == c][:3]) for c in (0, 1, 2)}
    pairs = [(a, b) for a in dists for b in dists if a != b]
    assert float(value) == pytest.approx(sum(_kl(dists[a], dists[b]) for a, b in pairs) / len(pairs), rel=1e-9)


def test_patch_shuffle_loss_hand_computed():
    from zsbir.losses.fine_grained import PatchShuffleLoss

    term = PatchShuffleLoss(margin=0.2, distance="cosine", grid=2)
    outputs = {"sketch": {"shuffled_embedding": torch.tensor([[1.0, 0.0], [1.0, 0.0]])},
               "photo_pos": {"shuffled_embedding": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
                             "reshuffled_embedding": torch.tensor([[1.0, 0.0], [-1.0, 0.0]])}}
    # item 1: max(0, 1 - 0 + 0.2) = 1.2; item 2: max(0, 0 - 2 + 0.2) = 0; mean 0.6
    assert float(term({}, outputs, None)) == pytest.approx(0.6)
    assert [p.key for p in term.auxiliary_passes] == [("patch_shuffle", 2)]


def test_shuffle_patches_lays_out_the_permuted_patches():
    from zsbir.models.auxiliary import shuffle_patches

    image = torch.arange(16.0).reshape(1, 1, 4, 4)  # patches (row-major): [0,1,4,5] [2,3,6,7] [8,9,12,13] [10,11,14,15]
    shuffled = shuffle_patches(image, 2, torch.tensor([[3, 0, 2, 1]]))
    assert shuffled[0, 0].tolist() == [[10, 11, 0, 1], [14, 15, 4, 5], [8, 9, 2, 3], [12, 13, 6, 7]]
    with pytest.raises(ValueError, match="divisible by 3"):
        shuffle_patches(image, 3, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8]]))


class FlattenEncoder:
    """Embeds an image as its pixels: equal embeddings = equal shuffled images."""

    def __call__(self, images, domain):
        return {"embedding": images.flatten(1)}


def test_patch_shuffle_pass_uses_the_same_permutation_for_the_positive_pair():
    from zsbir.models.auxiliary import PatchShufflePass, patch_permutations

    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8)
    batch = {"sketch": images, "photo_pos": images.clone(), "shuffle_seed": torch.arange(100, 106)}
    outputs = {"sketch": {}, "photo_pos": {}}
    PatchShufflePass(grid=2)(batch, outputs, FlattenEncoder())
    sketch, same, other = (outputs["sketch"]["shuffled_embedding"], outputs["photo_pos"]["shuffled_embedding"],
                           outputs["photo_pos"]["reshuffled_embedding"])
    assert torch.equal(sketch, same)  # same permutation: the pair still lines up patch for patch
    assert all(not torch.equal(sketch[i], other[i]) for i in range(6))  # another permutation: it does not
    assert not torch.equal(sketch, images.flatten(1))  # and the images were shuffled at all
    first, second = patch_permutations(torch.arange(100, 106), 4)
    again, _ = patch_permutations(torch.arange(100, 106), 4)
    assert torch.equal(first, again) and all(not torch.equal(a, b) for a, b in zip(first, second))


# ----------------------------------------------------------------------------- synthetic_fg end to end

def test_synthetic_fg_instances_and_their_triplets(compose_cfg, tmp_path):
    from zsbir.data.datamodule import load_split, train_loader
    from zsbir.data.instances import sketch_photo_index
    from zsbir.data.synthetic_fg import SyntheticFgSpec, expected_counts

    sizes = ["data.synthetic_fg.seen_classes=4", "data.synthetic_fg.unseen_classes=2",
             "data.synthetic_fg.photos_per_class=3", f"data.cache_dir={tmp_path}"]
    cfg = compose_cfg("data=synthetic_fg", "data.batch_size=4", *sizes).data
    data = load_split(cfg)
    counts = expected_counts(SyntheticFgSpec(**cfg.synthetic_fg))
    assert {k: v for k, v in data.counts().items() if k in counts} == counts
    photo_of = sketch_photo_index(data.zero_sketch, data.zero_photo)
    assert np.bincount(photo_of).tolist() == [2] * 6  # every photo an instance with its own two sketches
    loader = train_loader(data, cfg, "imagenet", ("sketch", "photo_pos", "photo_neg"), seed=0)
    expected_photo = sketch_photo_index(data.train_sketch, data.train_photo)
    for batch in loader:
        assert torch.equal(batch["pos_index"], torch.as_tensor(expected_photo[batch["index"].numpy()]))
        assert torch.equal(batch["neg_label"], batch["label"])  # the negative: another photo of the category
        assert bool((batch["neg_index"] != batch["pos_index"]).all())
        assert batch["shuffle_seed"].shape == (4,)


def test_fg_protocol_needs_a_fine_grained_dataset(compose_cfg):
    from zsbir.config import validate_config
    from zsbir.errors import ConfigError

    with pytest.raises(ConfigError, match="data.sampler=instances needs sketch-photo pairs"):
        validate_config(compose_cfg("experiment=sketch_lvm_fg", "data=synthetic"))


def test_relative_distance_term_needs_p_x_k_batches(compose_cfg):
    from zsbir.config import validate_config
    from zsbir.errors import ConfigError

    validate_config(compose_cfg("experiment=sketch_lvm_fg", "data=synthetic_fg"))  # the preset's 8 x 8
    with pytest.raises(ConfigError, match=r"loss.fg_relative .* needs P categories x K sketches per batch: "
                                          r"set data.balanced="):
        validate_config(compose_cfg("data=synthetic_fg", "loss=[triplet,fg_relative]"))
    with pytest.raises(ConfigError, match=r"at least 2 categories of at least 2 triplets per batch, "
                                          r"data.balanced is 8 x 1"):
        validate_config(compose_cfg("experiment=sketch_lvm_fg", "data=synthetic_fg",
                                    "data.balanced.items_per_class=1"))
    validate_config(compose_cfg("data=synthetic_fg", "loss=[triplet,fg_relative]", "loss.fg_relative.weight=0"))


def test_sketch_lvm_fg_smoke_run_writes_fg_metrics(tmp_path):
    import json

    from smokerun import train_smoke_run

    run = train_smoke_run(tmp_path, "experiment=sketch_lvm_fg", "data=synthetic_fg", f"data.cache_dir={tmp_path}",
                          "data.synthetic_fg.seen_classes=6", "data.synthetic_fg.unseen_classes=3",
                          "data.synthetic_fg.photos_per_class=4",
                          "data.balanced.classes_per_batch=4", "data.balanced.items_per_class=2")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["fg"]) == {"acc_1", "acc_5", "n_queries", "n_gallery"}
    assert 0.0 <= metrics["fg"]["acc_1"] <= metrics["fg"]["acc_5"] <= 1.0
    assert "acc@1" in (run / "results.txt").read_text()


def test_report_puts_published_fg_numbers_beside_ours(tmp_path):
    import csv
    import io
    import json

    from zsbir import report

    for seed, acc in ((1, 0.20), (2, 0.30)):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({
            "method": "sketch_lvm_fg", "dataset": "sketchy_fg", "model": "clip_prompt", "seed": seed,
            "protocol": "plain", "per_class": False, "metrics_order": ["map_200", "prec_200"],
            "test": {"map_200": 0.5, "prec_200": 0.5}, "protocols": ["zs", "fg"],
            "fg": {"acc_1": acc, "acc_5": 0.6, "n_queries": 10, "n_gallery": 5}}))
    markdown, _ = report.make_report([tmp_path])
    assert "### zsbir results — fine-grained ZS-SBIR (fg)" in markdown and "acc@1" in markdown
    text, _ = report.make_report([tmp_path], fmt="csv")
    fg_block = text[text.rindex("method,"):]  # one header row per protocol's block; fg comes last
    row = next(r for r in csv.DictReader(io.StringIO(fg_block)) if r["eval_protocol"] == "fg")
    assert float(row["sketchy_fg/acc_1/mean"]) == pytest.approx(0.25) and row["sketchy_fg/acc_1/n"] == "2"
    assert float(row["sketchy_fg/acc_1/paper"]) == pytest.approx(0.2868)
    assert float(row["sketchy_fg/acc_5/paper"]) == pytest.approx(0.6234)

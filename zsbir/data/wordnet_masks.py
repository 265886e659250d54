"""SAKE's class masks (`cid_mask`) rebuilt from WordNet 3.0 for every split.

SAKE's distillation term (zsbir/losses/distill.py) raises the teacher's probability of
the ImageNet classes related to a photo's class by `kdneg * M[y]`. SAKE ships M only for
Sketchy split 1 and TU-Berlin, as pickles; its authors built them with
src/sketchy_to_wnid.py / src/tuberlin_to_wnid.py. This module runs the same procedure:

1. Class -> WordNet noun synsets. From the training photo list: a photo named
   `n<8 digits>_<n>.<ext>` carries its ImageNet wnid; a class gets the distinct wnids of
   its photos in list order. A class with no such photo is looked up by name (first
   synset, with SAKE's hand fixes `HAND_FIXES`, plus ours for QuickDraw `QUICKDRAW_FIXES`;
   a spaced name is retried with underscores); a name WordNet does not know gives an
   all-zero row.
2. ImageNet class k -> its synset (`imagenet_label_to_wordnet_synset.txt`, SAKE's file).
3. M[y, k] = 1 if the synsets are equal or one is a hyponym (transitively) of the other,
   else their path similarity when above 0.2, else 0. With several synsets per class each
   one is applied in turn, a later one overwriting an earlier one where it sets a value
   (SAKE's loop, kept as it is so that the shipped pickles are reproduced exactly).

The rebuilt masks ship in the package as small JSON files (zsbir/data/class_masks/, one
per split folder, rows keyed by class name, only non-zero entries), so training needs
neither nltk nor WordNet. Rebuild them with

    python -m zsbir.data.wordnet_masks <dataset root or ../shared/splits> [--out DIR]

which needs nltk and WordNet 3.0: Debian's `wordnet-base` files (/usr/share/wordnet, read
directly) or `nltk.download("wordnet")` on a networked machine.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from zsbir.errors import ZsbirError

IMAGENET_CLASSES = 1000
SIMILARITY_THRESHOLD = 0.2  # SAKE's similarity_thrh
IMAGENET_SYNSETS = "imagenet_label_to_wordnet_synset.txt"
PACKAGED = "zsbir.data.class_masks"
DEBIAN_WORDNET = Path("/usr/share/wordnet")
WNID_PHOTO = re.compile(r"^n\d{8}_[0-9]+")  # SAKE's wnid_pattern

# SAKE's hand-picked synsets for classes whose photos carry no wnid: name -> (lemma, sense index).
HAND_FIXES = {
    "present": ("present", 1), "teddy-bear": ("teddy", 0), "flying saucer": ("ufo", 0),
    "potted plant": ("pot_plant", 0), "santa claus": ("santa_claus", 0), "person walking": ("person", 0),
    "person sitting": ("person", 0), "fire hydrant": ("fire_hydrant", 0), "outlet": ("wall_socket", 0),
    "flower with stem": ("flower", 0), "human-skeleton": ("skeleton", 2),
}

# Ours, in SAKE's spirit, for QuickDraw (which SAKE never covered; its photos carry no wnids, so
# every class is looked up by name): names whose first WordNet sense is not the drawn object.
QUICKDRAW_FIXES = {
    "hammer": ("hammer", 1), "hedgehog": ("hedgehog", 1), "church": ("church", 1), "scorpion": ("scorpion", 2),
    "castle": ("castle", 1), "lobster": ("lobster", 1), "pineapple": ("pineapple", 1),
}

# Every split folder -> the training photo list SAKE's procedure reads (absent lists: names only)
# and the hand fixes for classes looked up by name. SAKE's own fixes only where SAKE built masks,
# so that its pickles are reproduced exactly.
SPLITS = {
    "Sketchy/zeroshot1": ("all_photo_filelist_train.txt", HAND_FIXES),
    "Sketchy/zeroshot0": ("all_photo_filelist_train.txt", HAND_FIXES),
    "TUBerlin/zeroshot": ("ImageResized_ready_filelist_train.txt", HAND_FIXES),
    "QuickDraw/zeroshot": ("all_photo_train.txt", {**HAND_FIXES, **QUICKDRAW_FIXES}),
}

# WordNet's 45 lexicographer files (lexnames(5WN)); Debian's wordnet-base leaves this file out
# and nltk's reader opens it at start-up. Only Synset.lexname() reads it.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()



# What a cid_mask pickle may contain: numpy arrays / scalars and plain Python containers.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("collections", "OrderedDict"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a class-similarity mask holds only "
                                     "numpy arrays and plain containers")


def read_mask_pickle(path: Path):
    """The content of a class-mask pickle, through the restricted unpickler (never plain pickle.load)."""
    with Path(path).open("rb") as handle:
        return _ArrayUnpickler(handle, encoding="latin1").load()

class ClassMaskError(ZsbirError):
    """A class mask cannot be built or found (no WordNet, unknown split, class names that do not match)."""


# ------------------------------------------------------------------ WordNet


def open_wordnet(root: str | Path | None = None):
    """nltk's WordNet 3.0: the database files in `root` (default: $ZSBIR_WORDNET, then Debian's
    /usr/share/wordnet), or else nltk's own corpus (nltk.download("wordnet"))."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as err:
        raise ClassMaskError("building class masks needs nltk: pip install 'zsbir[masks]'") from err
    root = Path(root or os.environ.get("ZSBIR_WORDNET") or DEBIAN_WORDNET)
    if (root / "data.noun").is_file():
        class DatabaseFiles(WordNetCorpusReader):
            """The plain WordNet database files, without lexnames and without the multilingual mapping."""

            def open(self, fileid):
                if fileid == "lexnames" and not (root / "lexnames").is_file():
                    return io.StringIO("".join(f"{i:02d}\t{name}\t0\n" for i, name in enumerate(_LEXNAMES)))
                return super().open(fileid)

            def map_wn(self, version="wordnet"):
                return None  # maps OMW data from nltk's own WordNet copy, which is not needed (nor present)

        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))  # nltk only reads corpora under its data path
        wordnet = DatabaseFiles(str(root), None)
    else:
        try:
            from nltk.corpus import wordnet

            wordnet.get_version()  # loads the lazy corpus: LookupError when nltk has none
        except LookupError as err:
            raise ClassMaskError(
                f"WordNet 3.0 not found: no database files in {root} and no nltk corpus. Install Debian's "
                "wordnet-base (apt-get install wordnet-base), point $ZSBIR_WORDNET at a WordNet 3.0 'dict' folder, "
                "or run nltk.download('wordnet') on a networked machine") from err
    if wordnet.get_version() != "3.0":
        raise ClassMaskError(f"WordNet {wordnet.get_version()} found, but SAKE's masks and the ImageNet synset "
                             "offsets are WordNet 3.0: install WordNet 3.0 (Debian's wordnet-base)")
    return wordnet


# ------------------------------------------------------------------ SAKE's procedure


def read_class_ids(path: Path) -> dict[str, int]:
    """`<class name> <id>` per line (names may hold spaces) -> {name: id}, in file order."""
    classes = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, cid = line.strip().rsplit(maxsplit=1)
            classes[name] = int(cid)
    return classes


def photo_wnids(photo_list: Path | None) -> dict[str, list[str]]:
    """Class folder -> the distinct wnids of its photos, in list order ([] when none is wnid-named)."""
    found: dict[str, list[str]] = {}
    if photo_list is None or not photo_list.is_file():
        return found
    for line in photo_list.read_text().splitlines():
        if not line.strip():
            continue
        class_name, file_name = line.strip().rsplit(maxsplit=1)[0].split("/")[-2:]
        wnids = found.setdefault(class_name, [])
        if WNID_PHOTO.match(file_name.split(".")[0]):
            wnid = file_name.split("_")[0]
            if wnid not in wnids:
                wnids.append(wnid)
    return found


def class_synsets(wordnet, name: str, wnids: list[str], fixes: dict = HAND_FIXES) -> list | None:
    """The synsets SAKE assigns a class: its photos' wnids, else a hand fix, else the name's first synset."""
    if wnids:
        return [wordnet.synset_from_pos_and_offset("n", int(wnid[1:])) for wnid in wnids]
    if name in fixes:
        lemma, sense = fixes[name]
        return [wordnet.synsets(lemma)[sense]]
    # WordNet spells compounds with underscores; SAKE fixed its spaced names by hand (HAND_FIXES).
    # Retrying with underscores only reaches names SAKE's lookup misses (QuickDraw's 'wine bottle', ...).
    found = wordnet.synsets(name) or wordnet.synsets(name.replace(" ", "_"))
    return [found[0]] if found else None


def imagenet_synsets(wordnet, path: Path) -> list:
    """The 1000 ImageNet classes' synsets from SAKE's pretty-printed dict (ids like '01440764-n')."""
    offsets = re.findall(r"'id': '(\d{8})-n'", path.read_text())
    if len(offsets) != IMAGENET_CLASSES:
        raise ClassMaskError(f"{path} names {len(offsets)} ImageNet synsets, expected {IMAGENET_CLASSES}")
    return [wordnet.synset_from_pos_and_offset("n", int(offset)) for offset in offsets]


def hypernym_depths(synset) -> dict:
    """Each (instance) hypernym ancestor of `synset`, itself included, -> its shortest distance."""
    depths: dict = {}
    for ancestor, distance in synset.hypernym_distances():
        depths[ancestor] = min(distance, depths.get(ancestor, distance))
    return depths


def path_similarity(depths_a: dict, depths_b: dict) -> float | None:
    """nltk's Synset.path_similarity for two nouns from their hypernym_depths: 1 / (shortest path + 1).

    The same quantity (nouns share the root `entity`, so no simulated root), computed from
    depths cached per synset: nltk recomputes both ancestor sets on every call.
    """
    if len(depths_b) < len(depths_a):
        depths_a, depths_b = depths_b, depths_a
    distances = [d + depths_b[s] for s, d in depths_a.items() if s in depths_b]
    return 1.0 / (min(distances) + 1) if distances else None


def similarity_row(synsets: list | None, imagenet: list, imagenet_depths: list[dict] | None = None) -> np.ndarray:
    """SAKE's 1000-d row for one class (see the module docstring, step 3)."""
    imagenet_depths = imagenet_depths or [hypernym_depths(other) for other in imagenet]
    row = np.zeros(len(imagenet))
    for synset in synsets or []:
        below = set(synset.closure(lambda s: s.hyponyms()))
        # `synset` lies below an ImageNet class exactly when that class is among its hypernyms
        above = set(synset.closure(lambda s: s.hypernyms()))
        depths = hypernym_depths(synset)
        for k, other in enumerate(imagenet):
            if other == synset or other in below or other in above:
                row[k] = 1
            else:
                similarity = path_similarity(depths, imagenet_depths[k])
                if similarity is not None and similarity > SIMILARITY_THRESHOLD:
                    row[k] = similarity
    return row


def build_split(split_dir: Path, imagenet: list, wordnet, photo_list: str | None = None,
                fixes: dict = HAND_FIXES) -> dict:
    """The mask table of one split folder: {class name: {"synsets", "from", "row"}} in class-id order."""
    classes = read_class_ids(split_dir / "cname_cid.txt")
    wnids = photo_wnids(split_dir / photo_list if photo_list else None)
    imagenet_depths = [hypernym_depths(other) for other in imagenet]
    table = {}
    for name in sorted(classes, key=classes.get):
        synsets = class_synsets(wordnet, name, wnids.get(name, []), fixes)
        row = similarity_row(synsets, imagenet, imagenet_depths)
        table[name] = {
            "synsets": [s.name() for s in synsets or []],
            "from": "photo wnids" if wnids.get(name) else ("hand fix" if name in fixes else "class name"),
            "row": {str(k): float(row[k]) for k in np.flatnonzero(row)},
        }
    return table


def table_from_pickle(split_dir: Path) -> dict:
    """SAKE's own cid_mask.pickle of a split folder as a mask table (for splits whose photo list is not public)."""

    classes = read_class_ids(split_dir / "cname_cid.txt")
    rows = read_mask_pickle(split_dir / "cid_mask.pickle")
    table = {}
    for name in sorted(classes, key=classes.get):
        row = np.asarray(rows[classes[name]], dtype=np.float64).reshape(-1)
        table[name] = {"synsets": [], "from": "SAKE's cid_mask.pickle",
                       "row": {str(k): float(row[k]) for k in np.flatnonzero(row)}}
    return table


# ------------------------------------------------------------------ packaged masks


def packaged_name(split: str) -> str:
    """`Sketchy/zeroshot1` -> `sketchy_zeroshot1.json`."""
    return "_".join(Path(split).parts[-2:]).lower() + ".json"


REBUILT = "rebuilt from WordNet 3.0 with SAKE's procedure (src/sketchy_to_wnid.py; docs/methods.md, SAKE class masks)"
CONVERTED = "SAKE's cid_mask.pickle converted as it is: SAKE's procedure needs the photo wnids of a training photo list that is not public"


def write_table(table: dict, split: str, out_dir: Path, procedure: str = REBUILT) -> Path:
    path = out_dir / packaged_name(split)
    header = {"split": split, "wordnet": "3.0", "imagenet_classes": IMAGENET_CLASSES, "procedure": procedure}
    # one line per class, so that a rebuild's diff names the classes that changed
    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
    rows = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in table.items()]
    path.write_text("{\n" + "\n".join(lines) + '\n "classes": {\n' + ",\n".join(rows) + "\n }\n}\n")
    return path


def table_matrix(table: dict, class_names: list[str], source: str) -> np.ndarray:
    """Rows of `table` (name-keyed) for `class_names`, in that order: len(class_names) x 1000."""
    missing = [name for name in class_names if name not in table]
    if missing:
        raise ClassMaskError(f"the class mask {source} has no row for classes {missing[:5]} "
                             f"({len(missing)} of {len(class_names)}); it belongs to another split")
    matrix = np.zeros((len(class_names), IMAGENET_CLASSES), dtype=np.float64)
    for i, name in enumerate(class_names):
        for k, value in table[name]["row"].items():
            matrix[i, int(k)] = value
    return matrix


def load_table(path, class_names: list[str]) -> np.ndarray:
    """A JSON table written by `write_table` (a path or a package resource) as a matrix in `class_names` order."""
    try:
        table = json.loads(path.read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ClassMaskError(f"cannot read the class mask table {path}: {err!r}") from err
    return table_matrix(table, class_names, str(path))


def packaged_mask(split_dir: str | Path, class_names: list[str]) -> np.ndarray:
    """The shipped mask of a split folder (`<root>/Sketchy/zeroshot1` -> sketchy_zeroshot1.json), rows in
    `class_names` order. ClassMaskError when no mask ships for that folder."""
    name = packaged_name(str(split_dir))
    source = resources.files(PACKAGED) / name
    if not source.is_file():
        shipped = sorted(p.name for p in resources.files(PACKAGED).iterdir() if p.name.endswith(".json"))
        raise ClassMaskError(f"no packaged class mask for the split folder {split_dir} (looked for {name}; shipped: "
                             f"{', '.join(shipped)}). Build one with `python -m zsbir.data.wordnet_masks <root> --out "
                             "DIR` and set loss.distill.mask to its JSON file, or turn the term off with "
                             "loss.distill.mask=null")
    return load_table(source, class_names)


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsbir.data.wordnet_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="dataset root holding Sketchy/, TUBerlin/, QuickDraw/ split folders "
                                                f"and {IMAGENET_SYNSETS}")
    parser.add_argument("--out", type=Path, default=Path(str(resources.files(PACKAGED))),
                        help="folder for the JSON tables (default: the package's zsbir/data/class_masks)")
    parser.add_argument("--wordnet", type=Path, default=None, help="WordNet 3.0 database folder "
                                                                    "(default: $ZSBIR_WORDNET or /usr/share/wordnet)")
    parser.add_argument("--split", action="append", choices=sorted(SPLITS), help="only these splits (repeatable)")
    args = parser.parse_args(argv)
    synset_file = args.root / IMAGENET_SYNSETS
    if not synset_file.is_file():
        parser.error(f"{synset_file} not found: it ships with SAKE's dataset.zip (dataset/{IMAGENET_SYNSETS})")
    wordnet = open_wordnet(args.wordnet)
    imagenet = imagenet_synsets(wordnet, synset_file)
    for split in args.split or sorted(SPLITS):
        split_dir = args.root / split
        if not (split_dir / "cname_cid.txt").is_file():
            print(f"skip {split}: no {split_dir / 'cname_cid.txt'}", file=sys.stderr)
            continue
        (photo_list, fixes), procedure = SPLITS[split], REBUILT
        if (split_dir / photo_list).is_file():
            table = build_split(split_dir, imagenet, wordnet, photo_list, fixes)
        elif (split_dir / "cid_mask.pickle").is_file():
            # the photo wnids SAKE's procedure needs are in that list only (TU-Berlin's is not public)
            print(f"{split}: no {photo_list}; converting SAKE's cid_mask.pickle instead", file=sys.stderr)
            table, procedure = table_from_pickle(split_dir), CONVERTED
        else:
            print(f"{split}: no {photo_list}; classes are looked up by name", file=sys.stderr)
            table = build_split(split_dir, imagenet, wordnet, None, fixes)
        print(f"{split}: {len(table)} classes -> {write_table(table, split, args.out, procedure)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

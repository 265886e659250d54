"""Instance triplets for fine-grained training (`data.sampler: instances`).

An item is a sketch, the photo it was drawn from (`photo_pos`) and a negative photo
(`photo_neg`): another photo of the sketch's own category, the hard case fine-grained
retrieval has to separate, or of another category when its category has a single photo.
Batches come from the same seeded EpochBatchSampler as category-level triplets, so the
data stay a function of (seed, epoch, index). Each item also carries `shuffle_seed`, from
which the patch-shuffling objective (zsbir/losses/fine_grained.py) draws its permutations,
reproducibly and without touching any global generator.
"""
from __future__ import annotations

import numpy as np

from zsbir.data.instances import sketch_photo_index
from zsbir.data.pairs import TripletDataset


class InstanceTripletDataset(TripletDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.photo_of = sketch_photo_index(self.sketches, self.photos)

    def pick(self, index: int, rng: np.random.Generator) -> dict:
        label = self.sketches.labels[index]
        pos = int(self.photo_of[index])
        same = self.photos_by_class[label]
        same = same[same != pos]
        if len(same):
            neg = int(rng.choice(same))
        else:  # a category with one photo: the negative comes from another one
            others = self.photo_classes[self.photo_classes != label]
            neg = int(rng.choice(self.photos_by_class[int(rng.choice(others))]))
        return {"label": label, "neg_label": int(self.photos.labels[neg]), "index": index, "pos_index": pos,
                "neg_index": neg, "shuffle_seed": int(rng.integers(0, 2**62))}

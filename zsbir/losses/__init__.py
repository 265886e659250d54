"""Loss terms (one small module each) and the weighted LossSet that sums them."""
from zsbir.losses.base import LossContext, LossSet, LossTerm, build_loss_set

__all__ = ["LossContext", "LossSet", "LossTerm", "build_loss_set"]

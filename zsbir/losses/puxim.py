"""PuXIM's purified masked matching (docs/puxim.md, docs/methods.md section 5).

Both terms read the positive and negative photos "purified" by the VxL sampler
(zsbir/models/vxl.py): the encoder run again on only the patches most relevant to each
photo's class (`encoder.encode_masked`, model=puxim). That masked pass is an auxiliary
pass of the training step (zsbir/models/auxiliary.py: MaskedPhotoPass), run once per
step for both terms; they read its `masked_tokens` / `masked_keep_index` outputs.

- `puxim_recon` (PurifiedReconstructionLoss): a light decoder gets the kept patch
  tokens of the masked pass at their positions and a learned mask token at every masked
  position (plus fixed 2-D sin-cos positions, as MAE's decoder) and must predict the
  features the encoder gives the same photo UNMASKED (the trainer's ordinary forward),
  at the masked positions. Target: those tokens, detached and LayerNorm-normalised per
  token (no affine); loss: mean squared error over masked positions and channels.
- `puxim_match` (PurifiedMatchingLoss): an interaction head, nn.TransformerDecoder with
  batch_first=True (attention over the tokens of one sample, never across the batch),
  sketch patch tokens as queries and masked photo tokens as memory; its outputs are
  mean-pooled into a 2-way classifier; cross-entropy with (sketch, positive) = match (1)
  and (sketch, negative) = no match (0).
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from zsbir.losses.base import LossConfigError, LossContext, LossTerm
from zsbir.models.auxiliary import MaskedPhotoPass
from zsbir.models.puxim import TINY_WIDTH
from zsbir.models.vxl import VxLConfigError, VxLSampler, shared_sampler
from zsbir.models.weights import MissingWeightsError, tiny_weights_fit

log = logging.getLogger(__name__)

MASKED_VIEWS = ("photo_pos", "photo_neg")
# Augmentation recipes that never change a photo from one epoch to the next (so its mask can be cached).
DETERMINISTIC_AUGMENT = ("none",)


class PurifiedPhotosTerm(LossTerm):
    """Common part of the PuXIM terms: the VxL settings and the masked (purified) photo pass they read."""

    name = "puxim"

    def __init__(self, vxl: dict | None = None, cache_masks: bool = True, data_augment: str = "none",
                 tiny: bool = False):
        super().__init__()
        # the sampler's own defaults (the settings of loss/vxl/clip_surgery.yaml) for keys a config leaves out
        defaults = {name: p.default for name, p in inspect.signature(VxLSampler).parameters.items() if name != "tiny"}
        settings = {**defaults, **(vxl or {})}
        unknown = set(settings) - set(defaults)
        if unknown:
            raise LossConfigError(f"loss.{self.name}.vxl has unknown keys {sorted(unknown)}; known: "
                                  f"{', '.join(defaults)}")
        if tiny and not tiny_weights_fit(settings["pretrained"]):
            # model.tiny=true (debug=smoke) shrinks the VxL CLIP too, which no published tag fits
            log.info("loss.%s: tiny VxL CLIP: random weights instead of %r", self.name, settings["pretrained"])
            settings["pretrained"] = None
        settings["image_size"] = int(settings["image_size"])
        settings["mask_ratio"] = float(settings["mask_ratio"])
        settings["surgery_blocks"] = int(settings["surgery_blocks"])
        # Not a submodule: frozen, so neither trained nor written into checkpoints.
        sampler = self._build_sampler(settings, bool(tiny))
        self.cache_masks = bool(cache_masks) and data_augment in DETERMINISTIC_AUGMENT
        self.auxiliary_passes = (MaskedPhotoPass(sampler, self.cache_masks),)
        if cache_masks and not self.cache_masks:
            log.info("loss.%s: not caching VxL masks: data.augment=%s changes photos every epoch", self.name, data_augment)

    def _build_sampler(self, settings: dict, tiny: bool) -> VxLSampler:
        """The shared sampler; its errors name this term's config keys."""
        try:
            return shared_sampler(tiny=tiny, **settings)
        except VxLConfigError as err:
            raise VxLConfigError(f"loss.{self.name}.{err}") from None
        except MissingWeightsError:
            arch, tag = settings["arch"], settings["pretrained"]
            raise MissingWeightsError(
                f"the VxL sampler's CLIP weights {arch!r} / {tag!r} (open_clip) are not available: this machine is "
                f"offline and they are not in the HF cache. Provide a local file with "
                f"`loss.{self.name}.vxl.pretrained=/path/to/file` (experiment=puxim: the other PuXIM term follows), "
                f"written on a networked machine by `python -m zsbir.models.weights open_clip {arch} {tag} "
                f"clip_{arch}_{tag}.safetensors`; or run once with network so that open_clip caches them"
            ) from None

    @property
    def sampler(self) -> VxLSampler:
        return self.auxiliary_passes[0].sampler

    def check_encoder(self, encoder) -> None:
        if not (callable(getattr(encoder, "encode_masked", None)) and hasattr(encoder, "patch_grid")):
            raise LossConfigError(
                f"loss.{self.name} runs the encoder on the class-relevant photo patches only, which "
                f"{type(encoder).__name__} cannot do; use model=puxim (a ViT with encode_masked)"
            )
        self.sampler.check_grid(encoder.patch_grid)

    def check_token_width(self, encoder, key: str, width: int) -> None:
        """`loss.<term>.<key>` (the token width the term's head was built for) must be the encoder's."""
        if getattr(encoder, "width", width) != width:
            raise LossConfigError(f"loss.{self.name}.{key}={width} but the encoder's tokens are "
                                  f"{encoder.width}-d; set loss.{self.name}.{key}={encoder.width}")

    def on_train_start(self, ctx: LossContext, class_names: list[str]) -> None:
        self.check_encoder(ctx.encoder)


class MaskedTokenDecoder(nn.Module):
    """MAE-style light decoder: kept tokens at their positions, a mask token elsewhere -> every position."""

    def __init__(self, width: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, width)

    def forward(self, kept_tokens: torch.Tensor, keep_index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        from timm.layers import build_sincos2d_pos_embed

        batch, dim = kept_tokens.shape[0], self.mask_token.shape[0]
        x = self.mask_token.expand(batch, grid[0] * grid[1], dim)
        x = x.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, dim), self.embed(kept_tokens))
        x = x + build_sincos2d_pos_embed(list(grid), dim, device=x.device, dtype=x.dtype)
        return self.predict(self.norm(self.blocks(x)))


class PurifiedReconstructionLoss(PurifiedPhotosTerm):
    """Masked photo tokens -> light decoder -> the unmasked encoder features at the masked positions."""

    views = ("photo_pos", "photo_neg")
    name = "puxim_recon"

    def __init__(self, encoder_width: int = 768, decoder_dim: int = 384, decoder_depth: int = 2,
                 decoder_heads: int = 6, tiny: bool = False, **purify):
        super().__init__(tiny=tiny, **purify)
        if tiny:
            encoder_width, decoder_dim, decoder_heads = TINY_WIDTH, 32, 2
        if decoder_dim % decoder_heads:
            raise LossConfigError(f"loss.puxim_recon.decoder_dim={decoder_dim} is not divisible by "
                                  f"decoder_heads={decoder_heads}")
        self.encoder_width = int(encoder_width)
        self.decoder = MaskedTokenDecoder(self.encoder_width, int(decoder_dim), int(decoder_depth), int(decoder_heads))

    def check_encoder(self, encoder) -> None:
        super().check_encoder(encoder)
        self.check_token_width(encoder, "encoder_width", self.encoder_width)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        grid = ctx.encoder.patch_grid
        losses = []
        for view in MASKED_VIEWS:
            full = outputs[view].need("tokens", self.name).detach()
            target = F.layer_norm(full, full.shape[-1:])
            kept = outputs[view]["masked_keep_index"]
            prediction = self.decoder(outputs[view]["masked_tokens"], kept, grid)
            hidden = torch.ones(full.shape[:2], dtype=torch.bool, device=full.device)
            hidden.scatter_(1, kept, False)
            losses.append(((prediction - target) ** 2).mean(-1)[hidden])
        errors = torch.cat(losses)
        # mask_ratio so low that nothing is masked: nothing to reconstruct (keeps the graph for DDP)
        return errors.mean() if errors.numel() else prediction.sum() * 0.0


class InteractionHead(nn.Module):
    """Sketch tokens attend to photo tokens (within one pair); pooled -> match / no-match logits."""

    def __init__(self, d_model: int = 768, nhead: int = 4, dim_feedforward: int = 1024, num_layers: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.classifier = nn.Linear(d_model, 2)

    def forward(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.decoder(sketch_tokens, photo_tokens).mean(dim=1))


class PurifiedMatchingLoss(PurifiedPhotosTerm):
    """2-way CE of the interaction head: (sketch, positive) = match, (sketch, negative) = no match."""

    views = ("sketch", "photo_pos", "photo_neg")
    name = "puxim_match"

    def __init__(self, d_model: int = 768, nhead: int = 4, dim_feedforward: int = 1024, num_layers: int = 4,
                 dropout: float = 0.1, tiny: bool = False, **purify):
        super().__init__(tiny=tiny, **purify)
        if tiny:
            d_model, dim_feedforward = TINY_WIDTH, 128
        if d_model % nhead:
            raise LossConfigError(f"loss.puxim_match.d_model={d_model} is not divisible by nhead={nhead}")
        self.d_model = int(d_model)
        self.head = InteractionHead(self.d_model, int(nhead), int(dim_feedforward), int(num_layers), float(dropout))

    def check_encoder(self, encoder) -> None:
        super().check_encoder(encoder)
        self.check_token_width(encoder, "d_model", self.d_model)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        sketch = outputs["sketch"].need("tokens", self.name)
        photos = torch.cat([outputs["photo_pos"]["masked_tokens"], outputs["photo_neg"]["masked_tokens"]])
        logits = self.head(torch.cat([sketch, sketch]), photos)
        n = len(sketch)
        targets = torch.cat([torch.ones(n), torch.zeros(n)]).long().to(logits.device)
        return F.cross_entropy(logits, targets)

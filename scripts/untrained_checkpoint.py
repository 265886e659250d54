"""Write `<run>/untrained.pt`: the run's best.pt with the weights of a freshly built encoder.

The encoder is built as the trainer builds it (seeded with the run's seed, same model
config), so `python -m zsbir.eval run_dir=<run> ckpt=untrained.pt` reproduces the run's
"untrained network" row, under any protocol (docs/benchmarks.md, "Evaluation protocols").

    python scripts/untrained_checkpoint.py <run dir>
"""
import sys
from pathlib import Path

from omegaconf import OmegaConf

from zsbir.engine.checkpoint import load_checkpoint, save_atomic
from zsbir.engine.seed import seed_everything
from zsbir.models.encoder import build_encoder

run = Path(sys.argv[1])
cfg = OmegaConf.load(run / "config.yaml")
state = load_checkpoint(run / "best.pt")
seed_everything(int(cfg.seed))
state["model"] = build_encoder(cfg.model, int(state["fingerprint"]["seen_classes"])).state_dict()
state.update(step=0, epoch=0, batch_in_epoch=0)  # no training has touched these weights: eval's row says step 0
save_atomic(state, run / "untrained.pt")
print(run / "untrained.pt")

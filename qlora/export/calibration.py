"""Calibration for the 4- to 6-bit GGUF types: an importance matrix of the merged model, computed on the run's data.

llama.cpp's imatrix, computed here: for every linear layer, the mean over the calibration tokens of the square of
each input column's activation. A K-quant rounds each block to minimise the error weighted by it, so the columns
that carry most of the signal on the user's task are rounded most carefully. The calibration text is the run's
training data (never the held-out sequences the export is measured on), or a file the user names.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from qlora.config import Config, ExportConfig
from qlora.errors import QloraError, first_line

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Calibration:
    sequences: list[torch.Tensor]
    """1-D input ids."""
    source: str


def calibration_text(config: Config, tokenizer, options: ExportConfig) -> Calibration | None:
    """The sequences the importance matrix is computed from (export.calibration), or None for none."""
    from qlora import data as qdata

    if options.calibration == "none":
        return None
    data = config.data
    if options.calibration != "run_data":
        data = dataclasses.replace(data, path=str(Path(options.calibration).expanduser()), eval_path=None,
                                   eval_fraction=0.0)
    try:
        loaded = qdata.load(data, tokenizer, seq_len=config.train.seq_len, seed=config.seed,
                            cache_dir=Path(config.cache_dir).expanduser())
    except (QloraError, OSError) as e:
        raise QloraError(f"export.calibration={options.calibration}: cannot read the calibration data "
                         f"({first_line(e)}); give a data file in the run's data.format, or export.calibration=none "
                         "for plain round-to-nearest") from e
    examples = loaded.train
    if not examples:
        raise QloraError(f"export.calibration={options.calibration}: no sequences to calibrate on in {data.path}; "
                         "give another file, or export.calibration=none")
    step = max(1, len(examples) // options.calibration_samples)  # spread over the data, not its first records
    chosen = examples[::step][:options.calibration_samples]
    where = "the run's training data" if options.calibration == "run_data" else "the calibration file"
    return Calibration([torch.tensor(e.input_ids, dtype=torch.long) for e in chosen],
                       f"{len(chosen)} sequences ({sum(len(e.input_ids) for e in chosen)} tokens) of {where} "
                       f"({data.path})")


@torch.no_grad()
def importance_matrix(model: torch.nn.Module, calibration: Calibration) -> dict[str, torch.Tensor]:
    """Each linear layer's importance matrix, by its weight's name: the mean over the calibration tokens of each
    input column's squared activation (float32, one value per column)."""
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def collect(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).to(torch.float32)
            sums[name] = sums.get(name, 0) + x.square().sum(0).cpu()
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(collect(f"{name}.weight")) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    device = next(p.device for p in model.parameters())
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for ids in calibration.sequences:
            model(input_ids=ids[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    log.info("importance matrix of %d linear layers from %s in %.1fs", len(sums), calibration.source,
             time.perf_counter() - t0)
    return {name: total / tokens[name] for name, total in sums.items()}

"""Track 2 of the NanoGPT speedrun: the GPT-2 medium class model, target validation loss 2.92.

    torchrun --standalone --nproc_per_node=8 train_gpt_medium.py     # 8xH100
    ./train.sh --medium                                              # the same through the wrapper
    python train_gpt_medium.py --help                                # every flag, with this track's defaults

What it is: track 1's record-28 recipe (train_gpt.py: model, attention gate, windows, loss, FP8 head, optimisers,
loader) at the medium size, with the sizes, batch, steps and learning rates of the track-2 record of 2025-04-22
("Record8", 5,960 steps, final val loss 2.9198 in 24.5 min on 8xH100), whose log is
records/track_2_medium/2025-04-22_Record8/075_640429f2-e726-4e83-aa27-684626239ffc.txt in the modded-nanogpt
repository, and that record's per-layer window pattern. The track-2 record of the same era as track 1's record 28,
2025-08-28_Medium_NewValemb (5,820 steps, 2.9191), is Record8 with five value-embedding tables instead of three.
Only what differs from track 1 lives here; every run's log carries the source of both files.

It is not that record's function or update rule. Where Record8 differs from what this file runs:
- attention reads the block's input without RMSNorm, and RMSNorm is applied to v before the value-embedding mix;
  there is no attention gate (a track-1 idea of August 2025);
- three long skip connections (the outputs of blocks 2, 4 and 6 added to the inputs of blocks 11, 10 and 9) instead
  of the U-net skips;
- logits soft-capped as 15 z / sqrt(z^2 + 225), not 30 sigmoid(z / 7.5); the loss is the mean over the tokens
  and the head runs in bf16, not FP8;
- the long window grows as 3456 (4x^3 - 6x^2 + 3x) tokens (x = step / steps), in blocks, not linearly to 1728;
- the learning rates cool down to 0, not to 0.1 of their base;
- Muon: weight decay 0.01 x lr (twice that for the MLP matrices), a different Newton-Schulz coefficient for each of
  its five iterations, block matrices stored in bf16 with the low 16 bits of an fp32 master kept aside, and the MLP
  input matrix stored as (4096, 1024), so its shape scale is 2 (here 1);
- Adam: torch's AdamW arrangement (eps added to the bias-corrected root), not the record-28 arrangement;
- the loader takes contiguous 65,536-token slices without aligning them to documents.
Making the medium preset reproduce Record8 means implementing those as options of train_gpt.py; until then its
results compare with track 2's records only loosely. Nothing has been measured with it beyond its peak memory.
"""

import sys
from pathlib import Path

from runlib import devices, runlog
import train_gpt

TRACK2_TARGET = runlog.TRACK2_TARGET

MEDIUM = dict(
    num_layers=16, model_dim=1024, num_heads=8, head_dim=128,  # GPT-2 medium class
    window_pattern="LSSSLSSSSSSLSSSL",  # Record8's window of each of the 16 blocks
    train_seq_len=64 * 1024, seqs_per_step=8,  # 64K tokens per GPU per step on 8 GPUs: 524,288 per step
    loss_sum_tokens=64 * 1024,  # the step's loss: summed over each 64K-token sequence, averaged over the eight
    num_iterations=5960, cooldown_frac=0.7,
    muon_lr=0.025, adam_lr=0.3, head_lr=1 / 320, scalar_lr=0.015,
    target_val_loss=TRACK2_TARGET,
)

PRESETS = {"medium": MEDIUM}


def source() -> str:
    """This file, then the trainer it builds on: a track-2 log reproduces from the log alone."""
    here = Path(__file__).read_text(encoding="utf-8")
    base = Path(train_gpt.__file__).read_text(encoding="utf-8")
    return f"{here}\n{'=' * 100}\n# train_gpt.py\n{base}"


def main(argv=None) -> int:
    return train_gpt.main(argv, presets=PRESETS, default_preset="medium", prog="train_gpt_medium.py",
                          source=source())


if __name__ == "__main__":
    devices.reexec_with_cpu_malloc_settings()
    sys.exit(main())

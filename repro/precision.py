"""The numerical switches a number depends on: TF32 for matmuls and convolutions, read back as they took effect.

PyTorch's defaults are matmul TF32 off and cuDNN TF32 on. The papers' released code differs (DiT and DiC set both
on; DiCo leaves the defaults), and on an A100/H100 that one flag moves a conv model several-fold against a
transformer (benchmarks/results/README.md), so every stage sets both explicitly and records what was in effect.
On the CPU neither flag changes anything; they are recorded all the same.
"""

from __future__ import annotations

import contextlib

# How each model family's released training code sets TF32; a run of the family trains so unless its config says
# otherwise (planning reads this without importing torch).
OFFICIAL_TF32 = {
    "DiT": dict(matmul=True, cudnn=True, source="facebookresearch/DiT train.py at ed81ce2 sets both"),
    "DiC": dict(matmul=True, cudnn=True, source="YuchuanTian/DiC train.py at bfa541b sets both (as DiT)"),
    "DiCo": dict(matmul=False, cudnn=True, source="shallowdream204/DiCo train_accelerate.py: the TF32 lines are "
                                                 "commented out, so PyTorch's defaults"),
    "U-ViT": dict(matmul=False, cudnn=True, source="(A) PyTorch's defaults; U-ViT's code is not transcribed"),
    "DiG": dict(matmul=True, cudnn=True, source="hustvl/DiG train.py at 8c1e73a sets both (DiT's script)"),
}
# The comparison systems we only count and bench: (A) PyTorch's defaults, their training code not transcribed.
for _family in ("PixArt-α", "DiffiT", "DiT-LLaMA", "DiS", "DiM", "DiffuSSM", "DiMSUM"):
    OFFICIAL_TF32[_family] = dict(matmul=False, cudnn=True,
                                  source=f"(A) PyTorch's defaults; {_family}'s training code is not transcribed")


def departures(train, family: str) -> list[str]:
    """How a run's training precision departs from its family's released code (a protocol difference)."""
    out = []
    if train.amp != "off":
        out.append(f"trained with {train.amp} autocast; the {family} code trains in fp32")
    official = OFFICIAL_TF32.get(family)
    if official is not None and (train.tf32_matmul, train.tf32_cudnn) != (official["matmul"], official["cudnn"]):
        def onoff(flag):
            return "on" if flag else "off"

        out.append(f"TF32 matmul {onoff(train.tf32_matmul)}, cuDNN {onoff(train.tf32_cudnn)}; the {family} code: "
                   f"matmul {onoff(official['matmul'])}, cuDNN {onoff(official['cudnn'])}")
    return out


def set_tf32(matmul: bool, cudnn: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


def tf32_flags() -> dict:
    """The TF32 flags in effect now."""
    import torch

    return {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}


@contextlib.contextmanager
def tf32(matmul: bool, cudnn: bool):
    """TF32 flags set for a block and restored after it (stages called in-process must not leak them)."""
    saved = tf32_flags()
    set_tf32(matmul, cudnn)
    try:
        yield tf32_flags()
    finally:
        set_tf32(saved["tf32_matmul"], saved["tf32_cudnn"])

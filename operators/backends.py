"""Imports every backend module so it registers with its op (one line per backend module)."""

from operators import chunked_cross_entropy as _chunked_ce  # noqa: F401  memory-bounded CE
from operators import fast_elementwise as _fast_elementwise  # noqa: F401  rms_norm/swiglu/rotary/grouped_mm
from operators import maca as _maca  # noqa: F401  MetaX: fla with MetaX-tuned autotune lists (fla_maca)
from operators.attention import flash_attn_backend as _attn_fa  # noqa: F401  CUDA: flash-attn
from operators.attention import sdpa as _attn_sdpa  # noqa: F401  any: SDPA, block-local SWA
from operators.gla import chunked as _gla_chunked  # noqa: F401  CPU/any: chunked custom autograd
from operators.gla import fla_backend as _gla_fla  # noqa: F401  CUDA: flash-linear-attention

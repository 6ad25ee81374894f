"""megatron-core's own ``GPTDataset`` / ``BlendedMegatronDatasetBuilder`` over datasets built by sbtrain-data.

The trainer uses :class:`sbtrain.data.loader.PackedLoader` (document cursor across stages, global
sample count state, per-domain packing, cu_seqlens). This is the megatron-native alternative for a
single-stage run or a comparison, and it keeps the claim "megatron's sample index builder runs on
CPU" tested: its C++ ``helpers_cpp`` ships compiled in the megatron-core wheel. With ``cache_dir``
set, megatron asks ``torch.distributed.get_rank()``, so a process group must be initialised then.
"""

from __future__ import annotations

from collections.abc import Sequence

from sbtrain.data.build import dataset_prefix, read_manifest
from sbtrain.data.sources import DataError


class _ManifestTokenizer:
    """The three things GPTDataset asks of a tokenizer, read from the manifest."""

    def __init__(self, manifest: dict):
        tok = manifest["tokenizer"]
        self.eod = self.pad = int(tok["eod_id"])
        self.vocab_size = int(tok["vocab_size"])
        self.unique_identifiers = {"class": "sbtrain-manifest", "sha256": tok["sha256"]}


def gpt_datasets(dataset_dirs: Sequence[str], seq_len: int, num_train_samples: int, num_valid_samples: int = 0,
                 weights: Sequence[float] | None = None, seed: int = 1234, split: str = "99,1,0",
                 cache_dir: str | None = None) -> tuple[object, object | None]:
    """(train, valid) megatron datasets; items are dicts with ``tokens`` / ``labels`` of length seq_len."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    manifests = [read_manifest(d) for d in dataset_dirs]
    if len({m["tokenizer"]["sha256"] for m in manifests}) > 1:
        raise DataError(f"datasets {list(dataset_dirs)} were tokenized with different tokenizers")
    prefixes: list[str] = [dataset_prefix(d) for d in dataset_dirs]
    blend = (prefixes, [float(w) for w in weights] if weights else None)
    cfg = GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, blend=blend, split=split,
                           path_to_cache=cache_dir, tokenizer=_ManifestTokenizer(manifests[0]),
                           reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                           mid_level_dataset_surplus=0.005)
    sizes = [num_train_samples, num_valid_samples or None, 0 if weights else None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()
    return train, valid

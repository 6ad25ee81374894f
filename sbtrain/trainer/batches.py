"""Loader micro batches in the model's layout (the Trainer's ``TrainData`` / ``valid_data``)."""

from __future__ import annotations


class PackedBatches:
    """Adapts loader micro batches to the model: with document boundaries, a micro batch is
    flattened to one packed row so ``cu_seqlens`` (over the flattened tokens) applies."""

    def __init__(self, loader, eval_samples: int | None = None):
        self.loader, self.eval_samples = loader, eval_samples

    @staticmethod
    def to_model(mb: dict) -> dict:
        if "cu_seqlens" in mb:
            return {"input_ids": mb["input_ids"].reshape(1, -1), "labels": mb["labels"].reshape(1, -1),
                    "cu_seqlens": mb["cu_seqlens"]}
        return {"input_ids": mb["input_ids"], "labels": mb["labels"]}

    def next_global_batch(self) -> list[dict]:
        return [self.to_model(mb) for mb in self.loader.next_global_batch()]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict, new_stage: bool = False) -> None:
        """``new_stage``: a stage of another sequence length packs on from the document cursor."""
        self.loader.load_state_dict(state, new_stage=new_stage)

    def batches(self):
        for mb in self.loader.valid_batches(self.eval_samples):
            yield self.to_model(mb)


__all__ = ["PackedBatches"]

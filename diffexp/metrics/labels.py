"""Does a sample show its requested class? The shipped digits classifier reads each sample of a labelled run.

``label_accuracy`` is the fraction of samples the classifier assigns to their requested label; ``classes_produced``
how many distinct classes it reads. Only for 1-channel samples (the classifier's digits), with ``labels`` set.
"""

from __future__ import annotations

from typing import Any

import torch

from diffexp.metrics.base import Chunk, Context, Key, Metric, Values
from diffexp.metrics.features import feature_name, load_digits_features
from diffexp.sampling.loop import StepState


class LabelAccuracy(Metric):
    """``metrics.label_accuracy`` on a run with class labels: agreement of the digits classifier with them."""

    name = "labels"
    keys = (Key("label_accuracy", "higher"), Key("classes_produced"), Key("label_classifier"))

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        labels, run = ctx.run.first.labels, ctx.run
        explicit = labels is not None and labels != (run.model.null_class,) * len(labels)
        return ctx.settings.label_accuracy and explicit and run.model.sample_shape[0] == 1

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.net, metadata = load_digits_features()
        self.classifier = feature_name(metadata)

    def measure(self, chunk: Chunk, final: StepState) -> Values:
        read = self.net.classify(final.x_pixels.float().cpu()).argmax(dim=1)
        return {"read": read, "wanted": torch.tensor(chunk.labels)}

    def final(self, values: Values) -> dict[str, Any]:
        read = values["read"]
        return {
            "label_accuracy": (read == values["wanted"]).double().mean().item(),
            "classes_produced": int(read.unique().numel()),
            "label_classifier": self.classifier,
        }

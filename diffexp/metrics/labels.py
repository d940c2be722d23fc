"""Does a sample show its requested class, recognisably? The shipped digits classifier reads each sample of a
labelled run.

A sample counts for ``label_accuracy`` only if it is recognisable: the classifier is confident (its largest softmax
probability is at least ``CONFIDENT``, 0.5: one class is more likely than all others together) and its residual
noise is below the real digits' limit (diffexp/metrics/residual_noise.py), and then only if the class read is the
requested one. The classifier reads digits through grain, so agreement alone calls a noisy sample correct.

- ``label_accuracy``: the share of samples that are recognisable and read as their label.
- ``recognisable``: the share of samples that are recognisable, whatever class.
- ``label_agreement``: the share read as their label, recognisable or not (the rule before recognisability).
- ``classes_produced``: how many distinct classes the classifier reads.

Only for 1-channel samples (the classifier's digits), with ``labels`` set.
"""

from __future__ import annotations

from typing import Any

import torch

from diffexp.metrics.base import Chunk, Context, Key, Metric, Values
from diffexp.metrics.features import feature_name, load_digits_features
from diffexp.metrics.residual_noise import digits_limit, energy
from diffexp.sampling.loop import StepState

CONFIDENT = 0.5  # the classifier's largest softmax probability from which a reading counts


class LabelAccuracy(Metric):
    """``metrics.label_accuracy`` on a run with class labels: recognisable samples of the requested class."""

    name = "labels"
    keys = (
        Key("label_accuracy", "higher"),
        Key("recognisable", "higher"),
        Key("label_agreement"),
        Key("classes_produced"),
        Key("label_classifier"),
    )

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        labels, run = ctx.run.first.labels, ctx.run
        explicit = labels is not None and labels != (run.model.null_class,) * len(labels)
        return ctx.settings.label_accuracy and explicit and run.model.sample_shape[0] == 1

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.net, metadata = load_digits_features()
        self.classifier = feature_name(metadata)
        self.limit = digits_limit()  # the classifier's own real set: the digits

    def measure(self, chunk: Chunk, final: StepState) -> Values:
        x = final.x_pixels.float().cpu()
        proba = self.net.classify(x).softmax(dim=1)
        confidence, read = proba.max(dim=1)
        clean = energy(x) <= self.limit
        return {"read": read, "wanted": torch.tensor(chunk.labels), "recognisable": (confidence >= CONFIDENT) & clean}

    def final(self, values: Values) -> dict[str, Any]:
        read, recognisable = values["read"], values["recognisable"].bool()
        right = read == values["wanted"]
        return {
            "label_accuracy": (right & recognisable).double().mean().item(),
            "recognisable": recognisable.double().mean().item(),
            "label_agreement": right.double().mean().item(),
            "classes_produced": int(read.unique().numel()),
            "label_classifier": self.classifier,
        }

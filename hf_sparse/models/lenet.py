"""LeNet-300-100 and LeNet-5 (Caffe form): the classic benchmarks of the pruning papers.

Both are ``transformers`` models (config + ``PreTrainedModel``), registered with ``AutoConfig``
and ``AutoModelForImageClassification`` so ``from_pretrained`` loads them once hf_sparse is imported.
Layer widths live in the config, so a structurally purged model (fewer units/channels) is
described by its config and loads like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import ImageClassifierOutput

from ..data.image_processor import SparseImageProcessor
from .registry import register_model


class LeNetConfig(PretrainedConfig):
    """``variant`` is ``"300-100"`` (MLP) or ``"5"`` (conv 20 -> conv 50 -> fc 800->500 -> 500->10).

    ``hidden_sizes`` are the widths of the hidden layers: ``[300, 100]`` for the MLP,
    ``[20, 50, 500]`` (conv1 channels, conv2 channels, fc units) for LeNet-5.
    """

    model_type = "hf_sparse_lenet"

    def __init__(self, variant: str = "300-100", hidden_sizes: list[int] | None = None, num_channels: int = 1,
                 image_size: int = 28, num_labels: int = 10, **kwargs):
        if variant not in ("300-100", "5"):
            raise ValueError(f"LeNet variant must be '300-100' or '5', got {variant!r}")
        self.variant = variant
        self.hidden_sizes = list(hidden_sizes or ([300, 100] if variant == "300-100" else [20, 50, 500]))
        self.num_channels = num_channels
        self.image_size = image_size
        super().__init__(num_labels=num_labels, **kwargs)


class LeNetForImageClassification(PreTrainedModel):
    config_class = LeNetConfig
    main_input_name = "pixel_values"
    accepts_loss_kwargs = False  # forward takes **kwargs but computes a mean loss itself

    def __init__(self, config: LeNetConfig):
        super().__init__(config)
        c, s, h = config.num_channels, config.image_size, config.hidden_sizes
        if config.variant == "300-100":
            self.fc1 = nn.Linear(c * s * s, h[0])
            self.fc2 = nn.Linear(h[0], h[1])
            self.classifier = nn.Linear(h[1], config.num_labels)
        else:
            self.conv1 = nn.Conv2d(c, h[0], kernel_size=5)
            self.conv2 = nn.Conv2d(h[0], h[1], kernel_size=5)
            side = ((s - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4
            self.fc1 = nn.Linear(h[1] * side * side, h[2])
            self.classifier = nn.Linear(h[2], config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> None:
        """No token embeddings (Accelerate's FSDP2 preparation asks; transformers' default raises)."""
        return None

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)  # torch's default, made explicit
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                nn.init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        x = pixel_values
        if self.config.variant == "300-100":
            x = F.relu(self.fc1(x.flatten(1)))
            x = F.relu(self.fc2(x))
        else:
            x = F.max_pool2d(self.conv1(x), 2)  # Caffe LeNet: no activation after the convs
            x = F.max_pool2d(self.conv2(x), 2)
            x = F.relu(self.fc1(x.flatten(1)))
        logits = self.classifier(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(LeNetConfig.model_type, LeNetConfig)
AutoModelForImageClassification.register(LeNetConfig, LeNetForImageClassification)
# by class name, the image processor of every hf_sparse image checkpoint (LeNet, transformers, timm)
AutoImageProcessor.register(LeNetConfig, image_processor_classes={"pil": SparseImageProcessor,
                                                                  "torchvision": SparseImageProcessor})


def _lenet(variant: str):
    def factory(config: dict, data) -> LeNetForImageClassification:
        info = data.info if data is not None else {}
        cfg = LeNetConfig(variant=variant, num_channels=info.get("num_channels", 1), image_size=info.get("image_size", 28),
                          num_labels=data.num_labels if data is not None else 10, **config)
        if data is not None and data.label_names:
            cfg.id2label = dict(enumerate(data.label_names))
            cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        return LeNetForImageClassification(cfg)

    return factory


register_model("lenet300_100")(_lenet("300-100"))
register_model("lenet5")(_lenet("5"))


# -- purging (structured sparsity -> a physically smaller model) --------------------------------


def _removable(weight: torch.Tensor, next_in: list[torch.Tensor]) -> torch.Tensor:
    """Units whose removal cannot change the outputs: no incoming weight, or no outgoing weight.

    ``next_in[j]`` holds every weight of the next layer that reads unit ``j``.
    """
    dead_in = weight.flatten(1).eq(0).all(1)
    dead_out = torch.stack([w.eq(0).all() for w in next_in])
    return dead_in | dead_out


@torch.no_grad()
def purge_lenet(model: LeNetForImageClassification, structure: dict[str, list[int]] | None = None
                ) -> tuple[LeNetForImageClassification, dict[str, list[int]]]:
    """Remove hidden units/channels; return the smaller model and the kept indices per layer.

    A unit may go when its output cannot matter: all its incoming weights are zero (its output is
    the constant ``act(bias)``; that constant's contribution is folded into the next layer's bias,
    so outputs stay equal) or all its outgoing weights are zero (nothing reads it). ``structure``
    maps target weight names (``fc1.weight``...) to the units to keep, e.g. from a structured
    method; a listed removal that would change outputs is an error. Without ``structure`` every
    removable unit goes (at least one unit per layer stays, so shapes remain valid).
    """
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.variant == "300-100":
        # (layer, activation applied to a constant, next layer, input columns per unit of the next layer)
        chain = [("fc1", F.relu, "fc2", 1), ("fc2", F.relu, "classifier", 1)]
    else:
        side = ((cfg.image_size - 4) // 2 - 4) // 2
        chain = [("conv1", lambda t: t, "conv2", 1), ("conv2", lambda t: t, "fc1", side * side),
                 ("fc1", F.relu, "classifier", 1)]
    purgeable = {f"{name}.weight" for name, *_ in chain}
    structure = dict(structure or {})
    head = structure.pop("classifier.weight", None)
    if head is not None and sorted(head) != list(range(cfg.num_labels)):
        raise ValueError("the classifier's outputs are the labels; they cannot be purged")
    unknown = sorted(set(structure) - purgeable)
    if unknown:
        raise ValueError(f"cannot purge {', '.join(unknown)}; purgeable layers of LeNet-{cfg.variant}: "
                         f"{', '.join(sorted(purgeable))}")

    kept_all: dict[str, list[int]] = {}
    sizes = []
    for name, act, nxt, group in chain:
        w, b, w_next = sd[f"{name}.weight"], sd[f"{name}.bias"], sd[f"{nxt}.weight"]
        n = w.shape[0]

        def reads(j: int, w_next=w_next, group=group) -> torch.Tensor:
            return w_next[:, j] if w_next.dim() == 4 else w_next[:, j * group:(j + 1) * group]

        removable = _removable(w, [reads(j) for j in range(n)])
        wanted = structure.get(f"{name}.weight")
        if wanted is None:
            keep = (~removable).nonzero().flatten().tolist() or [0]
        else:
            keep = sorted({int(j) for j in wanted})
            if not keep or keep[0] < 0 or keep[-1] >= n:
                raise ValueError(f"{name}.weight: kept indices must be a non-empty subset of 0..{n - 1}")
            blocked = [j for j in range(n) if j not in keep and not removable[j]]
            if blocked:
                raise ValueError(f"{name}.weight: units {blocked[:10]} still have incoming and outgoing weights; "
                                 "removing them would change the outputs")
        kept_set = set(keep)
        dropped = [j for j in range(n) if j not in kept_set]
        dead_in = w.flatten(1).eq(0).all(1)
        bias_next = sd[f"{nxt}.bias"]
        for j in dropped:
            if dead_in[j]:  # constant output act(b_j): fold its contribution into the next bias
                bias_next += act(b[j]) * reads(j).flatten(1).sum(1)
        idx = torch.tensor(keep, dtype=torch.long)
        sd[f"{name}.weight"], sd[f"{name}.bias"] = w[idx].contiguous(), b[idx].contiguous()
        if w_next.dim() == 4:
            cols = idx
        else:
            cols = (idx[:, None] * group + torch.arange(group)).flatten()
        sd[f"{nxt}.weight"] = w_next[:, cols].contiguous()
        kept_all[f"{name}.weight"] = keep
        sizes.append(len(keep))

    new_cfg = LeNetConfig.from_dict({**cfg.to_dict(), "hidden_sizes": sizes})
    dtype = next(model.parameters()).dtype
    small = LeNetForImageClassification(new_cfg).to(dtype)
    small.load_state_dict(sd)
    return small.eval(), kept_all

"""Named training recipes, taken from the tutorials resnet_fast grew from.

`--recipe NAME` fills in every setting below; flags given on the command line
override single values (e.g. `--recipe imagenette-resnet50d --epochs 5`).

| recipe               | arch      | images (center crop)  | optimizer, schedule | batch x epochs | tutorial's result |
|----------------------|-----------|-----------------------|---------------------|----------------|-------------------|
| imagenette-resnet50d | resnet50d | Imagenette 320 -> 224 | SGD 0.05, OneCycle  | 128 x 20       | 83.13% top-1 (0)  |
| imagenette-resnet18  | resnet18  | Imagenette 160 -> 128 | SGD 0.05, OneCycle  | 128 x 5        | val loss 0.81 (1) |
| imagenette-cnn       | cnn       | Imagenette 160 -> 128 | SGD 0.05, OneCycle  | 128 x 5        | val loss 0.98 (2) |
| cifar10-resnet18     | resnet18  | CIFAR-10 resized 224  | Adam 1e-3, none     | 64 x 10        | none reported (3) |

Sources: the imagenette-* recipes are seed 004 (the Imagenette tutorial),
cifar10-resnet18 is seed 000 (a ResNet course). SGD is momentum 0.9, weight
decay 5e-4; Adam has no weight decay.
(0) and val loss 0.544.
(1) for its ResNet-18 with the "bag of tricks" stem (resnet18d); no accuracy reported.
(2) train loss 0.83; no accuracy reported.
(3) the tutorial prints only its last batch loss.

Seed 004's ResNets are the "bag of tricks" ResNet-D design (3-conv stem,
average-pool shortcut downsampling): resnet50d here.
The tutorials feed unnormalised [0, 1] pixels; resnet-fast train normalises
with the ImageNet mean and std (BatchNorm after the first convolution makes
the two nearly equivalent). Both tutorials train in fp32 (`--amp none`).
The data root in each recipe is the tutorial's; pass `--data KIND:ROOT` for
yours.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_SEED_004_SGD = dict(optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="onecycle",
                     batch_size=128, amp="none", label_smoothing=0.0)


@dataclass(frozen=True)
class Recipe:
    source: str
    expected: str
    settings: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "imagenette-resnet50d": Recipe(
        source="seed 004 (Imagenette tutorial), its ResNet-50 run",
        expected="83.13% val top-1, val loss 0.544 after 20 epochs",
        settings=dict(_SEED_004_SGD, arch="resnet50d", data="imagenette:data/imagenette",
                      size=320, img_size=224, epochs=20),
    ),
    "imagenette-resnet18": Recipe(
        source="seed 004 (Imagenette tutorial), its ResNet-18 run",
        expected="val loss 0.81 after 5 epochs (with the resnet18d stem); no accuracy reported",
        settings=dict(_SEED_004_SGD, arch="resnet18", data="imagenette:data/imagenette",
                      size=160, img_size=128, epochs=5),
    ),
    "imagenette-cnn": Recipe(
        source="seed 004 (Imagenette tutorial), its plain CNN baseline",
        expected="train loss 0.83, val loss 0.98 after 5 epochs; no accuracy reported",
        settings=dict(_SEED_004_SGD, arch="cnn", data="imagenette:data/imagenette",
                      size=160, img_size=128, epochs=5),
    ),
    "cifar10-resnet18": Recipe(
        source="seed 000 (ResNet course), CIFAR-10 with Adam",
        expected="none reported",
        settings=dict(arch="resnet18", data="cifar10:data", img_size=224, optimizer="adam",
                      lr=1e-3, weight_decay=0.0, schedule="none", batch_size=64, epochs=10,
                      amp="none", label_smoothing=0.0),
    ),
}

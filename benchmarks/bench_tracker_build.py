"""Cost of building a KernelTracker (construction only, no start()) on a ResNet-18 with a
1000-class head: the construction-time dry run must stay bounded (issue 13).

Usage: python benchmarks/bench_tracker_build.py [--res 224] [--probe 32]
Prints build seconds and the process's peak RSS (ru_maxrss) before and after the build.
Run once per checkout (PYTHONPATH=<checkout>) to compare; numbers go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from lazy_monitor import KernelTracker


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 layout (BasicBlock, [2, 2, 2, 2]) without torchvision."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18(args.classes).eval()
    probe = torch.randn(args.probe, 3, args.res, args.res)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    KernelTracker(model, probe, kernel={"kind": "full"})
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"resnet18 O={args.classes} res={args.res} N={args.probe}: build {seconds:.1f} s, "
        f"peak RSS {rss0:.2f} GiB before -> {rss1:.2f} GiB after"
    )


if __name__ == "__main__":
    main()

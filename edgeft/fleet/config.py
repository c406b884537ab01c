"""The fleet's options: how many devices, how many rounds, how the server aggregates (one declaration, read by
the CLI flags and a recipe's `fleet:` section alike)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeft.core import schema
from edgeft.core.schema import spec

# Flower strategies by the name a recipe gives them (flwr.serverapp.strategy); the server-side optimizers take
# `server_lr` as their eta.
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "fedtrimmedavg")
PRIVACY = ("none", "fixed", "adaptive")  # Flower's server-side differential-privacy wrappers, by clipping kind
PARTITIONS = ("iid", "files")


@dataclass(frozen=True)
class FleetConfig:
    clients: int = spec("devices of the simulated fleet (with partition files: the number of files)", 4,
                        min=1, max=10_000)
    rounds: int = spec("federated rounds", 3, min=1, max=100_000)
    local_steps: int = spec("optimizer steps each device runs per round", 10, min=1, max=1_000_000)
    fraction: float = spec("share of the devices asked to train in each round", 1.0, gt=0, max=1)
    min_clients: int = spec("fewest updates that make a round: a round with fewer keeps the previous global adapter",
                            1, min=1)
    strategy: str = spec("aggregation (Flower's strategy of that name)", "fedavg", choices=STRATEGIES)
    server_lr: float = spec("server learning rate of fedadam / fedyogi / fedadagrad (eta), and fedavgm's", 0.1,
                            gt=0)
    proximal_mu: float = spec("fedprox: weight of the proximal term (torch backend)", 0.01, min=0)
    privacy: str = spec("differential privacy: Flower's server-side clipping wrapper", "none", choices=PRIVACY)
    noise: float = spec("differential privacy: noise multiplier", 0.0, min=0)
    clip: float = spec("differential privacy: clipping norm of an update (fixed; the initial one for adaptive)",
                       1.0, gt=0)
    evaluate: bool = spec("each device evaluates every round's global adapter on its own validation split", True)
    partition: str = spec("iid: split the training data evenly; files: one JSONL per device in `data_dir`", "iid",
                          choices=PARTITIONS)
    data_dir: str | None = spec("with partition files: a folder of JSONL files, one per device", None,
                                flag="--data-dir")
    timeout: float = spec("seconds the server waits for a round's updates", 3600.0, gt=0)
    seed: int = spec("seed of the partition, of each device's data order and of the sampling", 0)
    resources: float = spec("simulation: CPU cores per simulated device (devices run side by side by this share)",
                            1.0, gt=0)

    def __post_init__(self):
        problems: list[str] = []
        schema.check(problems, self.min_clients <= max(1, math.ceil(self.fraction * self.clients)),
                     f"min_clients: {self.min_clients} is more than the {math.ceil(self.fraction * self.clients)} "
                     f"device(s) a round asks (fraction {self.fraction:g} of {self.clients}); lower it or ask more")
        schema.check(problems, self.partition != "files" or bool(self.data_dir),
                     "partition: files needs data_dir, a folder of JSONL files (one per device)")
        schema.check(problems, self.privacy == "none" or self.strategy in ("fedavg", "fedprox"),
                     f"privacy: {self.privacy} wraps fedavg or fedprox here (the clipping is of each update), not "
                     f"{self.strategy}")
        schema.raise_if(problems, "fleet options")

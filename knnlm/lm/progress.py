"""Training progress: a tqdm bar with loss, perplexity, learning rate and tokens/s."""
from __future__ import annotations

import math
import time

from tqdm import tqdm

LOG2 = math.log(2)


class TrainProgress:
    def __init__(self, trainer, disable: bool = False):
        self.trainer = trainer
        c, s = trainer.cfg, trainer.state
        total = c.max_update or None
        self.bar = tqdm(total=total, initial=s["num_updates"], unit="upd", desc="train",
                        disable=True if disable else None, dynamic_ncols=True)
        self.t_last = time.perf_counter()
        self.nll, self.ntok = 0.0, 0
        self.valid_ppl = None

    def update(self, nll: float, ntok: int) -> None:
        self.nll += nll
        self.ntok += ntok
        self.bar.update(1)
        now = time.perf_counter()
        if now - self.t_last >= 1.0 or self.bar.n == self.bar.total:
            loss = self.nll / max(1, self.ntok) / LOG2
            post = dict(loss=f"{loss:.3f}", ppl=f"{2 ** loss:.1f}",
                        lr=f"{self.trainer.optimizer.param_groups[0]['lr']:.2e}",
                        wps=f"{self.ntok / (now - self.t_last):,.0f}")
            if self.valid_ppl is not None:
                post["valid_ppl"] = f"{self.valid_ppl:.1f}"
            self.bar.set_postfix(post, refresh=False)
            self.t_last, self.nll, self.ntok = now, 0.0, 0

    def valid(self, loss_nats: float) -> None:
        self.valid_ppl = math.exp(loss_nats)

    def close(self) -> None:
        self.bar.close()

"""``online``: the served ``lstm``'s online part alone, as an evaluable family.

Why: the served prediction blends a network with the online model of
:mod:`models.online`; ``fbp evaluate --models lstm,online`` runs both on the
same events in one command, so the difference is the network's share.

It is an :class:`models.lstm.LSTMModel` whose blend gives the online part all
the weight (``online_weight = 1``): every path -- ``step``, ``online_step``,
``forward_sequence``, ``learn_batch``, the simulator's fast path -- computes
exactly the served model's online half, and the movie side is shared and
merged the same way.  The network it carries is the smallest one (hidden 1,
k 1): it has no weight in the prediction, so the simulator neither
fine-tunes it nor runs it (``network_weight == 0``).  Offline training
(``fbp train --model online``) has only the data's mean to give it: it
becomes the prior of the online running mean, as for the served ``lstm``.
"""

from __future__ import annotations

from models.lstm import LSTMModel


class OnlineModel(LSTMModel):
    name = "online"

    def __init__(self, hidden: int = 1, item_dim: int = 1, k: int = 1, **kw) -> None:
        kw.update(online=True, online_weight=1.0)
        super().__init__(hidden=hidden, item_dim=item_dim, k=k, **kw)

"""The online surrogate of router training (`flextron.train.surrogate`)."""

import torch

from flextron.options import RouteOptions
from flextron.routers import Choices, StaticRouter, gumbel
from flextron.space import ElasticSpace
from flextron.train.surrogate import OnlineSurrogate, random_logits


def test_surrogate_learns_a_known_loss_of_the_choices():
    torch.manual_seed(1)  # the initial weights, whichever tests ran before (a few seeds need more than 300 steps)
    space = ElasticSpace(mlp=[[8, 16, 24, 32]] * 4, attn=[[1, 2], [1, 2], [1, 2, 3], [1, 2, 3]])
    router = StaticRouter(space, (0.5, 1.0))
    cfg = RouteOptions()
    gen = torch.Generator().manual_seed(0)
    w_mlp, w_attn = torch.rand(4, 4, generator=gen), torch.rand(4, 3, generator=gen)

    def loss(mlp, attn):  # additive per-layer terms and one interaction between layers 0 and 1
        im, ia = mlp.argmax(-1), attn.argmax(-1)
        return (w_mlp[range(4), im].sum() + w_attn[range(4), ia].sum() + 0.5 * (im[0] == im[1])).item()

    surrogate = OnlineSurrogate(router.n_choices, cfg, gen, torch.device("cpu"))
    assert not surrogate.accurate  # nothing seen yet
    for _ in range(300):
        logits = Choices(random_logits(router.mlp_mask, gen), random_logits(router.attn_mask, gen))
        sample = logits.map(lambda x: gumbel(x, 1.0, gen))
        assert sample.attn[:2, 2].sum() == 0  # padding never chosen
        surrogate.observe(logits.map(lambda x: x.softmax(-1)), sample, loss(sample.mlp, sample.attn))
    assert surrogate.accurate and surrogate.error < cfg.surrogate_threshold
    # Its gradient ranks one layer's choices as the known loss does (other layers held one-hot).
    mlp = torch.nn.functional.one_hot(torch.tensor([3, 0, 1, 2]), 4).float().requires_grad_(True)
    attn = torch.nn.functional.one_hot(torch.tensor([1, 1, 2, 0]), 3).float()
    surrogate.predict(Choices(mlp, attn)).backward()
    best, worst = w_mlp[2].argmin(), w_mlp[2].argmax()
    assert mlp.grad[2, best] < mlp.grad[2, worst]

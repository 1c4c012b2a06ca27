import torch
import torch.nn.functional as F

from conftest import make_model
from flextron.elastic import ElasticModel
from flextron.train.distill import chunked_distill_terms
from flextron.train.loop import kd_loss


def test_chunked_loss_equals_the_full_logits_loss_in_value_and_gradient():
    em, teacher = ElasticModel(make_model("llama", seed=0)), ElasticModel(make_model("llama", seed=1))
    em.set_subnet(em.space.smallest())
    ids = torch.randint(0, 128, (3, 11))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
        t_hidden = teacher(input_ids=ids, head=lambda h, out: h)

    logits = em(input_ids=ids).logits
    full_kd = kd_loss(logits, t_logits, 2.0)
    full_lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (full_kd + 0.3 * full_lm).backward()
    ref = {n: p.grad.clone() for n, p in em.named_parameters()}
    em.zero_grad()

    t_head = teacher.model.get_output_embeddings()
    kd, lm = em(input_ids=ids, head=lambda h, out: chunked_distill_terms(h, t_hidden, ids, out, t_head, 2.0, chunk=5))
    (kd + 0.3 * lm).backward()
    assert torch.allclose(kd, full_kd, rtol=1e-5) and torch.allclose(lm, full_lm, rtol=1e-5)
    for n, p in em.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-7), n
    assert all(p.grad is None for p in teacher.parameters())


def test_chunks_are_recomputed_in_backward_not_kept():
    em = ElasticModel(make_model("llama"))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        t_hidden = em(input_ids=ids, head=lambda h, out: h)
    head = em.model.get_output_embeddings()

    def saved_logit_bytes(chunk: int) -> int:
        sizes = []

        def pack(t):
            if t.shape[-1:] == (128,):  # vocabulary-wide tensors
                sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kd, _ = em(input_ids=ids, head=lambda h, out: chunked_distill_terms(h, t_hidden, ids, out, head,
                                                                                chunk=chunk))
        kd.backward()
        return sum(sizes)

    assert saved_logit_bytes(8) == 0  # nothing vocabulary-wide survives to backward

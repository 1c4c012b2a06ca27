"""The training losses: distillation on logits, and the same read over the vocabulary in chunks."""

import pytest
import torch
import torch.nn.functional as F

from flextron.elastic import ElasticModel
from flextron.options import TrainOptions
from flextron.train.losses import chunked_distill_loss, distill_loss, kd_loss
from helpers import make_model


def test_teacher_gets_no_gradients_and_loss_is_kd():
    em = ElasticModel(make_model("llama"))
    teacher = ElasticModel(make_model("llama")).requires_grad_(False)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    with em.subnet(em.space.smallest()):
        loss, parts = distill_loss(em(input_ids=ids).logits, t, ids, TrainOptions(max_steps=1, lm_weight=0.5))
        loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in em.parameters())
    assert loss.item() == pytest.approx(parts["kd"] + 0.5 * parts["lm"], rel=1e-5)
    # Identical student and teacher: zero KL.
    same, _ = distill_loss(t, t, ids, TrainOptions(max_steps=1))
    assert same.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chunked_loss_equals_the_full_logits_loss_in_value_and_gradient(kind):
    em, teacher = ElasticModel(make_model(kind, seed=0)), ElasticModel(make_model(kind, seed=1))
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
    loss, kd, lm = em(input_ids=ids, head=lambda h, out: chunked_distill_loss(h, t_hidden, ids, out, t_head, 1.0,
                                                                               0.3, 2.0, chunk=5))
    (2 * loss).backward()  # the upstream gradient scales what the forward accumulated
    assert torch.allclose(kd, full_kd, rtol=1e-5) and torch.allclose(lm, full_lm, rtol=1e-5)
    assert torch.allclose(loss, full_kd + 0.3 * full_lm, rtol=1e-5)
    for n, p in em.named_parameters():
        assert torch.allclose(p.grad, 2 * ref[n], rtol=1e-4, atol=1e-6), n
    assert all(p.grad is None for p in teacher.parameters())


def test_a_mask_limits_both_terms_to_the_positions_predicting_its_tokens():
    """Chat data trained on the assistant's tokens only: the chunked loss equals KL and CE computed
    directly on the positions before each masked token, in value and gradient; the logits path agrees."""
    em, teacher = ElasticModel(make_model("llama", seed=0)), ElasticModel(make_model("llama", seed=1))
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3:6] = mask[1, 7:] = True
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
        t_hidden = teacher(input_ids=ids, head=lambda h, out: h)
    rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)  # position t predicts token t + 1
    logits = em(input_ids=ids).logits
    s_log, t_log = F.log_softmax(logits[rows, cols], -1), F.log_softmax(t_logits[rows, cols], -1)
    ref_kd = (t_log.exp() * (t_log - s_log)).sum(-1).mean()
    ref_lm = F.cross_entropy(logits[rows, cols], ids[rows, cols + 1])
    (ref_kd + 0.5 * ref_lm).backward()
    ref = {n: p.grad.clone() for n, p in em.named_parameters()}
    em.zero_grad()
    cfg = TrainOptions(max_steps=1, lm_weight=0.5, loss_chunk=4)
    t_head = teacher.model.get_output_embeddings()
    loss, parts = em(input_ids=ids, head=lambda h, out: distill_loss(h, t_hidden, ids, cfg, out, t_head, mask))
    loss.backward()
    assert parts["kd"] == pytest.approx(ref_kd.item(), rel=1e-5)
    assert parts["lm"] == pytest.approx(ref_lm.item(), rel=1e-5)
    for n, p in em.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-6), n
    with torch.no_grad():
        _, on_logits = distill_loss(em(input_ids=ids).logits, t_logits, ids, cfg, mask=mask)
    assert on_logits["kd"] == pytest.approx(ref_kd.item(), rel=1e-5)
    assert on_logits["lm"] == pytest.approx(ref_lm.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chunked_loss_at_a_smaller_hidden_size_equals_the_loss_on_the_models_own_logits(kind):
    """The student's hidden states have d channels: its head reads the first d columns; the teacher's all."""
    em, teacher = ElasticModel(make_model(kind, seed=0)), ElasticModel(make_model(kind, seed=1))
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 1.0), 16))
    em.set_subnet(em.space.uniform(1, 1, hidden_index=0))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
        t_hidden = teacher(input_ids=ids, head=lambda h, out: h)

    logits = em(input_ids=ids).logits
    ref_loss = kd_loss(logits, t_logits) + 0.5 * F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in em.named_parameters() if p.grad is not None}
    em.zero_grad()

    widths = []
    loss, _, _ = em(input_ids=ids, head=lambda h, out: widths.append(h.shape[-1]) or chunked_distill_loss(
        h, t_hidden, ids, out, teacher.model.get_output_embeddings(), 1.0, 0.5, chunk=4))
    loss.backward()
    assert widths == [32] and torch.allclose(loss, ref_loss, rtol=1e-5)
    head = em.model.get_output_embeddings().weight
    assert head.grad[:, :32].abs().sum() > 0 and not head.grad[:, 32:].any()  # unused columns get nothing
    assert {n for n, p in em.named_parameters() if p.grad is not None} == set(ref)
    for n, p in em.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-6), n


def test_no_vocabulary_wide_tensor_is_kept_for_backward():
    em = ElasticModel(make_model("llama"))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        t_hidden = em(input_ids=ids, head=lambda h, out: h)
    head = em.model.get_output_embeddings()

    def saved_shapes(loss_of) -> list[tuple]:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of()
        loss.backward()
        return shapes

    chunked = saved_shapes(lambda: em(input_ids=ids, head=lambda h, out: chunked_distill_loss(
        h, t_hidden, ids, out, head, lm_weight=1.0, chunk=8))[0])
    plain = saved_shapes(lambda: em(input_ids=ids).logits.float().log_softmax(-1).sum())
    assert not any(s[-1] == 128 for s in chunked)  # [..., vocab]: logits or probabilities
    assert any(s[-1] == 128 for s in plain)

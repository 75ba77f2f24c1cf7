"""Distillation objective: the teacher inside a primed model is its source; only the new paths learn."""

from __future__ import annotations

import pytest
import torch
from test_priming import B_F_OPTIONS, LENGTH, build_source, random_ids, source_logits

from bmojo_neuron.priming import prime_model
from bmojo_neuron.priming.compare import relative_difference
from bmojo_neuron.priming.distill import LayerwiseDistillation, freeze_shared, new_parameter_names

NARROW = dict(B_F_OPTIONS, window_size=8, fading_window=8, memory_chunk=8)  # most of the 48 tokens lie outside


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    build_source(path, "qwen3-qk-norm")
    return path


def test_teacher_is_the_source(source_dir):
    """The teacher pass of a primed BF model (8-token window) reproduces the source's logits: it runs every layer
    as full attention with the primed model's own (shared) weights."""
    source = build_source(source_dir, "qwen3-qk-norm")
    model = prime_model(source_dir, "BF", NARROW).model
    ids = random_ids()
    with torch.no_grad():
        last = LayerwiseDistillation().teacher_states(model, ids)[-1]
        teacher_logits = model.lm_head(model.model.norm(last))
        student_logits = model(ids).logits
    assert relative_difference(source_logits(source, ids), teacher_logits) <= 1e-5
    assert relative_difference(source_logits(source, ids), student_logits) > 1e-2  # the student is not the teacher


def test_only_new_parameters_train(source_dir):
    model = prime_model(source_dir, "BF", NARROW).model.train()
    new = set(new_parameter_names(model))
    assert new and all(".ssm." in n or "innovation_proj" in n or n.endswith("ssm_residual_gain") for n in new)
    assert sum(n.endswith("ssm_residual_gain") for n in new) == 2  # the B and the F layer's
    trainable = freeze_shared(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in new)
    objective = LayerwiseDistillation(kl_weight=0.5)
    loss, metrics = objective(model, random_ids())
    loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in new), name
    assert all(param.grad.abs().sum() > 0 for name, param in model.named_parameters() if name in new), \
        [name for name, param in model.named_parameters() if name in new and not param.grad.abs().sum() > 0]
    loss_value, hidden_mse, kl, aux = metrics.tolist()
    assert hidden_mse > 0 and kl > 0 and aux > 0
    assert loss_value == pytest.approx(hidden_mse + 0.5 * kl + aux, rel=1e-6)
    assert not any(isinstance(v, torch.Tensor) for v in vars(objective).values())  # no weights of its own


def test_student_equal_to_teacher_has_zero_loss(source_dir):
    """With the window over the whole sequence the student layers are the teacher's: nothing to distil."""
    model = prime_model(source_dir, "BF", B_F_OPTIONS).model
    assert model.config.window_size >= LENGTH
    _, metrics = LayerwiseDistillation(kl_weight=1.0)(model, random_ids())
    _, hidden_mse, kl, _ = metrics.tolist()
    assert hidden_mse < 1e-10 and abs(kl) < 1e-6  # float32 rounding of two equal distributions


def test_distillation_steps_lower_the_loss(source_dir):
    """Machinery check on one fixed batch: Adam steps on the new parameters lower the objective."""
    torch.manual_seed(0)
    model = prime_model(source_dir, "BF", NARROW).model.train()
    freeze_shared(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    objective, ids = LayerwiseDistillation(), random_ids()
    losses = []
    for _ in range(8):
        loss, _ = objective(model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("pattern, options, message", [
    ("AM", {}, "has M layers"),
    ("AA", {}, "nothing to distil|no new path"),
    ("BF", {"fading_window": 0, "memory_size": 0}, "no new path"),
])
def test_refused_patterns(source_dir, pattern, options, message):
    model = prime_model(source_dir, pattern, options).model
    with pytest.raises(ValueError, match=message):
        LayerwiseDistillation()(model, random_ids())


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="not both 0"):
        LayerwiseDistillation(hidden_weight=0.0, kl_weight=0.0)
    with pytest.raises(ValueError, match="kl_temperature"):
        LayerwiseDistillation(kl_temperature=0.0)

"""The phase declarations (common/federation/phases.py) are what the egress policy, the packing, the best-round
groups and both sides' step registries read."""

from __future__ import annotations

import re
import re._parser as sre_parse  # the stdlib's regex parser: one matching example per declared name pattern

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedslide.client import local_phases
from fedslide.client.client_app import SITE_STEPS
from fedslide.client.client_app import app as client_app
from fedslide.common import egress
from fedslide.common.distillation.stages import scatter_kd_targets
from fedslide.common.egress import Allowed, ArraySpec, EgressViolation, check_reply, weights_reply
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.models import pack_experts, pack_models, unpack_experts
from fedslide.common.seeds import SEED_OFFSETS
from fedslide.server.protocol import SERVER_STEPS, plan


def example(pattern: str) -> str:
    """One string that fully matches `pattern` (the first branch of every alternation, one repeat)."""

    def build(items: list) -> str:
        out = []
        for op, arg in items:
            name = str(op)
            if name == "LITERAL":
                out.append(chr(arg))
            elif name == "SUBPATTERN":
                out.append(build(list(arg[-1])))
            elif name == "BRANCH":
                out.append(build(list(arg[1][0])))
            elif name == "MAX_REPEAT":
                out.append(build(list(arg[2])) * max(arg[0], 1))
            elif name == "IN":
                out.append("0" if any(str(a) == "CATEGORY" for a, _ in arg) else chr(arg[0][1]))
            elif name == "ANY":
                out.append("x")
            else:
                raise NotImplementedError(f"{name} in {pattern!r}")
        return "".join(out)

    text = build(list(sre_parse.parse(pattern)))
    assert re.fullmatch(pattern, text), (pattern, text)
    return text


def _arrays(phase: ph.Phase) -> tuple[ArrayRecord, dict[str, ArraySpec]]:
    names = [example(a) for a in phase.array_names]
    record = ArrayRecord({n: Array(np.zeros((2, 3), np.float32)) for n in names})
    return record, egress.specs_of(record)


@pytest.mark.parametrize("phase", ph.ALL, ids=lambda x: x.name)
def test_every_declared_metric_leaves_and_nothing_else(phase: ph.Phase) -> None:
    declared = {example(m): 1.0 for m in phase.metrics}
    check_reply(RecordDict({p.METRICS: MetricRecord(declared)}), Allowed(phase.name))
    others = {example(m) for other in ph.ALL for m in other.metrics} - set(declared)
    for name in ["TCGA-AB-1234", "slide-ids", *[n for n in others if not phase.allows_metric(n)]]:
        with pytest.raises(EgressViolation, match="metric names not allowed"):
            check_reply(RecordDict({p.METRICS: MetricRecord({**declared, name: 1.0})}), Allowed(phase.name))


@pytest.mark.parametrize("phase", ph.ALL, ids=lambda x: x.name)
def test_every_declared_array_leaves_and_nothing_else(phase: ph.Phase) -> None:
    leak = ArrayRecord({"features": Array(np.zeros((7, 3), np.float32))})
    if phase.reply_arrays is None:
        for name in (p.ARRAYS, p.STATS, p.LOGITS_RECORD, "coords"):
            with pytest.raises(EgressViolation, match="array record"):
                check_reply(RecordDict({name: leak}), Allowed(phase.name, name, egress.specs_of(leak)))
        return
    record, specs = _arrays(phase)
    allowed = Allowed(phase.name, phase.reply_arrays, specs)
    check_reply(RecordDict({phase.reply_arrays: record}), allowed)
    with pytest.raises(EgressViolation, match="array record"):  # another record name
        check_reply(RecordDict({"coords": record}), Allowed(phase.name, "coords", specs))
    grown = ArrayRecord({**dict(record.items()), "features": leak["features"]})
    with pytest.raises(EgressViolation, match="arrays not"):  # one more array than the reply may carry
        check_reply(RecordDict({phase.reply_arrays: grown}), allowed)
    if not phase.is_weights:  # a name the phase does not declare is refused even where the caller lists it
        with pytest.raises(EgressViolation, match="not declared"):
            check_reply(
                RecordDict({phase.reply_arrays: grown}), Allowed(phase.name, phase.reply_arrays, egress.specs_of(grown))
            )


@pytest.mark.parametrize("phase", ph.ALL, ids=lambda x: x.name)
def test_only_the_handshake_sends_a_config_and_only_its_declared_keys(phase: ph.Phase) -> None:
    if phase.reply_config is None:
        with pytest.raises(EgressViolation, match="config record"):
            check_reply(RecordDict({p.SITE: ConfigRecord({ph.SITE_NAME: "a"})}), Allowed(phase.name))
        return
    keys: dict[str, str | list[str]] = {k: "x" for k in phase.reply_config_keys}
    keys[ph.CLASSES] = ["tumour", "normal"]
    check_reply(RecordDict({phase.reply_config: ConfigRecord(keys)}), Allowed(phase.name))
    with pytest.raises(EgressViolation, match="config keys not allowed"):
        check_reply(RecordDict({phase.reply_config: ConfigRecord({**keys, "slide-ids": ["a"]})}), Allowed(phase.name))


def test_weights_replies_carry_exactly_the_model_that_was_sent() -> None:
    sent = pack_models(
        {
            p.TEACHER: ArrayRecord({"params": Array(np.zeros(5, np.float32))}),
            p.BASELINE: ArrayRecord({"params": Array(np.zeros(3, np.float32))}),
        }
    )
    encoder = ArrayRecord({f"{ph.ENCODER_PREFIX}conv.weight": Array(np.zeros(5, np.float32))})
    bd = ArrayRecord(
        {"multi.head.weight": Array(np.zeros(5, np.float32)), "single.prompt": Array(np.zeros(3, np.float32))}
    )
    for phase in ph.WEIGHTS:
        sent = encoder if phase is ph.PIXEL_STAGE1 else bd if phase is ph.CLINICAL else sent
        allowed = weights_reply(phase.name, sent)
        check_reply(RecordDict({p.ARRAYS: sent}), allowed)
        reshaped = ArrayRecord({k: Array(np.zeros(9, np.float32)) for k in sent})
        with pytest.raises(EgressViolation, match="allowed only"):
            check_reply(RecordDict({p.ARRAYS: reshaped}), allowed)


def test_the_egress_tables_are_the_declarations() -> None:
    assert egress.PHASES == tuple(x.name for x in ph.ALL)
    assert egress.METRIC_NAMES == {x.name: x.metrics for x in ph.ALL}
    assert set(egress.WEIGHT_PHASES) == {"pixel-stage1", "adapter", "teacher", "experts", "student", "clinical"}
    assert egress.HANDSHAKE_KEYS == ph.HANDSHAKE.reply_config_keys == {k for k, _ in ph.HANDSHAKE_CONFIG}
    with pytest.raises(EgressViolation, match="unknown phase"):
        check_reply(RecordDict({}), Allowed("features"))


def test_packing_and_best_round_groups_agree() -> None:
    model = ArrayRecord({"params": Array(np.zeros(4, np.float32))})
    packed = pack_models({m: model for m in ph.TEACHER.members})
    for group in ph.TEACHER.best_groups().values():
        assert [k for k in packed if k.startswith(group.prefix)] == [f"{group.prefix}params"]
    experts = pack_experts([model] * 12)
    groups = ph.EXPERTS.best_groups(12)
    assert sorted(groups, key=int) == [str(c) for c in range(12)]
    for c, group in groups.items():
        assert [k for k in experts if k.startswith(group.prefix)] == [f"{group.prefix}params"], c
        assert group.loss_key == ph.member_metric(ph.VAL_LOSS, c) and ph.EXPERTS.allows_metric(group.loss_key)
    assert len(unpack_experts(experts)) == 12  # expert-10 sorts after expert-9
    assert ph.ADAPTER.best_groups() == {"": ph.BestGroup("", ph.VAL_LOSS, ph.VAL_N)}


def test_every_phase_has_its_site_step_and_its_server_step() -> None:
    assert set(SITE_STEPS) == set(ph.ALL)
    assert set(local_phases.TRAIN_STEPS) == set(local_phases.VALIDATE_STEPS) == set(ph.WEIGHTS)
    assert set(SERVER_STEPS) == set(ph.ALL) - {ph.HANDSHAKE}  # the handshake runs before the models exist
    routes = set(client_app._registered_funcs)  # Flower's routing table: "<category>.<action>"
    assert routes == {x.message_type if x.action else f"{x.message_type}.default" for x in ph.ALL}


def test_the_run_plan_follows_the_mode() -> None:
    from fedslide.common.config.federation import FederationConfig

    weights = plan(FederationConfig())
    assert weights[0] is ph.ADAPTER and weights[-1] is ph.EVALUATION
    assert ph.KD_CACHE in weights and ph.LOGITS not in weights
    no_experts = FederationConfig(mode="logits", proxy_dir=".", kd={"lambda_expert": 0.0})
    assert ph.LOGITS in plan(no_experts) and ph.EXPERTS not in plan(no_experts)


def test_config_phase_names_resolve() -> None:
    assert ph.by_config("final") is ph.EVALUATION and ph.by_name("evaluate") is ph.EVALUATION
    assert ph.by_config("teacher") is ph.TEACHER
    with pytest.raises(ValueError, match="unknown phase 'features'"):
        ph.by_config("features")


def test_seed_offsets_are_the_ones_every_run_used() -> None:
    """Changing one changes every model's initial weights: results would no longer reproduce."""
    assert vars(SEED_OFFSETS) == {
        "adapter": 1,
        "teacher": 2,
        "clusters": 3,
        "experts_init": 3,
        "baseline_rounds": 4,
        "student_rounds": 5,
        "experts": 10,
        "proxy_teacher": 20,
        "proxy_experts": 30,
        "pixel_stage1": 40,
        "student": 100,
    }


def test_kd_targets_sit_at_the_training_slides_cohort_index() -> None:
    train = np.array([3, 0])
    teacher = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    experts = torch.stack([teacher + 10, teacher + 20])
    targets = scatter_kd_targets(5, 2, train, teacher, experts, np.array([1, 0]))
    assert torch.equal(targets.teacher[3], teacher[0]) and torch.equal(targets.teacher[0], teacher[1])
    assert targets.teacher[[1, 2, 4]].abs().sum() == 0
    assert targets.experts is not None and torch.equal(targets.experts[1, 0], teacher[1] + 20)
    assert targets.cluster.tolist() == [0, -1, -1, 1, -1]
    assert scatter_kd_targets(5, 2, train, teacher).experts is None


def test_server_messages_carry_only_what_their_phase_declares() -> None:
    ph.KD_CACHE.check_sent([p.CONFIG, p.TEACHER, p.ADAPTER], [ph.TEACHER_FINGERPRINT])
    ph.EXPERTS.check_sent([p.ARRAYS, p.CENTROIDS], [ph.ROUND_OFFSET, ph.TEACHER_FINGERPRINT, ph.PROXIMAL_MU])
    with pytest.raises(ValueError, match=r"phase cluster-stats: records \['teacher'\]"):
        ph.CLUSTER_STATS.check_sent([p.CENTROIDS, p.TEACHER])
    with pytest.raises(ValueError, match=r"config keys \['eval-split'\]"):
        ph.ADAPTER.check_sent([p.ARRAYS], [ph.EVAL_SPLIT])

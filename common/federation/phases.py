"""Every phase of the federation, declared once: its messages, what its reply may carry, how its models are packed.

The egress allow-list (`common.egress`), the server's best-round groups (`server.protocol`), the packing
of several models into one record (`common.federation.models`), the metric names a site reports and the
ClientApp's dispatch (`client.local_phases`, `client.client_app`) all read these declarations. The site
step and the server step of each phase are registered by declaration on their own side
(`client.client_app.SITE_STEPS` with `client.local_phases.TRAIN_STEPS`/`VALIDATE_STEPS`, and
`server.protocol.SERVER_STEPS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from fedslide.common.federation import per_class
from fedslide.common.federation import protocol as p

# ---- message categories (Flower message types are "<category>" or "<category>.<action>") -------------------
QUERY = "query"
TRAIN = "train"  # every weights phase's local rounds; the phase is named in the config record
EVALUATE = "evaluate"  # validation of a weights phase's global model, and the final evaluation

# ---- config keys of the server's messages ---------------------------------------------------------------
RUN_ID, PHASE, SERVER_ROUND, ROUND_OFFSET = "run-id", "phase", "server-round", "round-offset"
TEACHER_FINGERPRINT, PROXIMAL_MU, EVAL_SPLIT = "teacher-fingerprint", "proximal-mu", "eval-split"

# ---- metric names a site reports -----------------------------------------------------------------------
NUM_EXAMPLES, UNIT_WEIGHT, SECONDS, EPOCHS = "num-examples", "unit-weight", "seconds", "epochs"
TRAIN_LOSS, VAL_LOSS, VAL_N = "train-loss", "val-loss", "val-n"
N_TRAIN, N_TEST, N_EXPERT = "n-train", "n-test", "n-expert"
EMBEDDING_DIM, MOVED, PROXY_N = "embedding-dim", "moved", "proxy-n"
ENCODER_DIM, TOKEN_GRID, CHILD_GRID = "encoder-dim", "token-grid", "child-grid"
SPLITS = ("train", "val", "test")

# ---- array names of replies -----------------------------------------------------------------------------
SUMS, COUNTS = "sums", "counts"  # cluster statistics
TEACHER_LOGITS, EXPERT_LOGITS, EXPERT_WEIGHTS = "teacher", "experts", "expert-weights"  # logits on the proxy cohort
CENTROIDS = "centroids"  # the one array of the server's centroid record
# a site's feature sums for federated standardisation (handshake reply, common.federation.feature_stats)
FEATURE_SUMS, FEATURE_SQUARES, FEATURE_COUNTS = "feature-sums", "feature-squares", "feature-counts"
# a site's clinical-vector sums for the clinical encoder's input normalisation (handshake reply, common.clinical)
CLINICAL_SUMS, CLINICAL_SQUARES, CLINICAL_COUNTS = "clinical-sums", "clinical-squares", "clinical-counts"
# the server's pooled standardisation (record STANDARDIZE of the phases that read 20x or adapted instances)
STANDARDIZE, FEATURE_MEAN, FEATURE_STD = "standardize", "mean", "std"
# a site's OOD sums of its training slides' mean 5x features (handshake reply, common.federation.ood_stats) and the
# server's pooled OOD statistics (record OOD of the evaluation: arrays mean, var and ood-counts)
OOD_SUMS, OOD_SQUARES, OOD_COUNTS = "ood-sums", "ood-squares", "ood-counts"
OOD, OOD_MEAN, OOD_VAR = "ood", "mean", "var"

# ---- federated temperature scaling (phase `calibrate`, common.federation.temperature) ------------------------
TEMPERATURES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)  # T >= 1, as the centralized fit (it only softens)
CALIBRATED_MODELS = ("teacher_high", "student_low")
STUDENT_TEMPERATURE, TEACHER_TEMPERATURE = "student-temperature", "teacher-temperature"  # evaluation config keys
ENCODER_PREFIX = "encoder."  # pixel stage 1: `encoder.<parameter name>`, one array per trainable encoder parameter
ENCODER_ARRAY = re.escape(ENCODER_PREFIX) + r"\w+(\.\w+)*"
HEAD_PREFIX = "head."  # pixel stage 1 with the VIB objective: `head.<parameter name>` of its fine-tuning MIL head
HEAD_ARRAY = re.escape(HEAD_PREFIX) + r"\w+(\.\w+)*"
REENCODED = "reencoded"  # pixel stage 1: 5x feature files a site re-encoded (or found done) with the global encoder

# ---- config keys of the handshake reply ------------------------------------------------------------------
SITE_NAME, ENCODER_NAME, ENCODER_HASH, ENCODER_FINGERPRINT, CLASSES = (
    "site-name",
    "encoder-name",
    "encoder-hash",
    "encoder-fingerprint",
    "classes",
)

# ---- how much a reply may carry beyond its declared arrays (the egress byte cap) -----------------------------
MAX_CLASSES = 64  # classes a site may name in its handshake
ARRAY_SLACK = 1.05  # a reply's serialized arrays may exceed their raw bytes by this factor
REPLY_ALLOWANCE = 16 * 1024  # bytes for a reply's metrics and config, beyond its arrays
MEMBER_ALLOWANCE = 1024  # bytes more per packed model of a weights phase (its per-member metrics)
METRIC_BYTES = 64  # serialized size bound of one metric entry (name and value)


@dataclass(frozen=True)
class ConfigValue:
    """What one config entry of a reply may hold: a string (with `max_items`, a list of at most that many strings),
    each of at most `max_length` characters fully matching `pattern` (a safe character set)."""

    pattern: str
    max_length: int
    max_items: int = 0

    @property
    def max_bytes(self) -> int:
        """Serialized size bound of the entry's value (UTF-8: up to 4 bytes a character, plus framing)."""
        return max(1, self.max_items) * (4 * self.max_length + 8)

    def problem(self, key: str, value: object) -> str | None:
        """Why `value` may not leave as config entry `key`, or None when it may."""
        if self.max_items:
            if not isinstance(value, list) or len(value) > self.max_items:
                return f"config {key!r} must be a list of at most {self.max_items} strings"
            items = value
        elif isinstance(value, str):
            items = [value]
        else:
            return f"config {key!r} must be a string, got {type(value).__name__}"
        for item in items:
            if not isinstance(item, str) or len(item) > self.max_length or not re.fullmatch(self.pattern, item):
                shown = repr(item)[:40] + ("..." if len(repr(item)) > 40 else "")
                return (
                    f"config {key!r} holds {shown} (length {len(item) if isinstance(item, str) else '?'}); allowed: "
                    f"strings of at most {self.max_length} characters matching {self.pattern}"
                )
        return None


_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # site names: letters, digits, '.', '_' and '-'
_TOKEN = r"[A-Za-z0-9:./_+-]*"  # encoder names, hashes, fingerprints
_LABEL = r"[\w .,:()+/-]+"  # class names
HANDSHAKE_CONFIG: tuple[tuple[str, ConfigValue], ...] = (
    (SITE_NAME, ConfigValue(_NAME, 64)),
    (ENCODER_NAME, ConfigValue(_TOKEN, 128)),
    (ENCODER_HASH, ConfigValue(_TOKEN, 128)),
    (ENCODER_FINGERPRINT, ConfigValue(_TOKEN, 128)),
    (CLASSES, ConfigValue(_LABEL, 64, MAX_CLASSES)),
)


def member_metric(key: str, member: str | int) -> str:
    """The metric `key` of one model of a packed phase (e.g. `val-loss-teacher`, `val-loss-2`, `n-expert-2`)."""
    return f"{key}-{member}"


def split_count(split: str, label: int | None = None) -> str:
    """The handshake's slide count of a split (`n-train`), or of one class in it (`n-train-class-1`)."""
    return f"n-{split}" if label is None else f"n-{split}-class-{label}"


def model_metric(model: str, metric: str) -> str:
    """A final-evaluation metric of one model (`student_low.auc`)."""
    return f"{model}.{metric}"


def nll_metric(model: str, index: int) -> str:
    """A site's summed val NLL of `model` at temperature TEMPERATURES[index] (`nll-student_low-3`)."""
    return f"nll-{model}-{index}"


def cost_metric(resolution: str, what: str) -> str:
    """A final-evaluation cost (`cost.low.seconds_per_slide`)."""
    return f"cost.{resolution}.{what}"


@dataclass(frozen=True)
class BestGroup:
    """Arrays of one model inside a phase's record, and the val metrics that pick its best round."""

    prefix: str
    loss_key: str
    n_key: str


_TRAINING_METRICS = tuple(
    re.escape(k) for k in (NUM_EXAMPLES, UNIT_WEIGHT, TRAIN_LOSS, VAL_LOSS, VAL_N, EPOCHS, SECONDS)
)
EVALUATED_MODELS = ("teacher_high", "student_low", "baseline_low", "lrmil_low")
EVALUATION_METRICS = ("auc", "acc", "balanced_acc", "f1", "brier", "ece", "loss", "n")


@dataclass(frozen=True)
class Phase:
    """One phase: its messages, what its reply may carry (full-match regexes of names) and how its models pack.

    A weights phase (message type `train`) replies with the arrays it was sent, trained; its models are
    `members` (fixed names) or `numbered` (`expert-<c>`), each packed under `<member>.`; a phase with neither
    carries one model under plain names. `step` names the server step the phase belongs to (checkpoints).
    """

    name: str
    message_type: str
    config_keys: tuple[str, ...] = ()  # config entries beyond run-id, phase, server-round and the Facts
    sends: tuple[str, ...] = ()
    reply_arrays: str | None = None
    array_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    reply_config: str | None = None
    reply_config_values: tuple[tuple[str, ConfigValue], ...] = ()  # each config key a reply may carry, its values
    reply_allowance: int = REPLY_ALLOWANCE  # bytes for metrics and config beyond the arrays (the byte cap)
    members: tuple[str, ...] = ()
    numbered: str | None = None
    config_name: str | None = None
    step: str | None = None

    @property
    def phase(self) -> str:
        """The value of the `phase` config entry of its messages."""
        return self.config_name or self.name

    @property
    def checkpoint(self) -> str:
        """The server step (checkpoint entry) this phase belongs to."""
        return self.step or self.name

    @property
    def category(self) -> str:
        """The category part of its message type (`query`, `train`, `evaluate`)."""
        return self.message_type.partition(".")[0]

    @property
    def action(self) -> str:
        """The action part of its message type (`handshake` of `query.handshake`), what ClientApp registers."""
        return self.message_type.partition(".")[2]

    @property
    def reply_config_keys(self) -> frozenset[str]:
        """The config keys its reply may carry."""
        return frozenset(key for key, _ in self.reply_config_values)

    def config_value(self, key: str) -> ConfigValue | None:
        """What config entry `key` of its reply may hold (None: the key may not leave)."""
        return dict(self.reply_config_values).get(key)

    def reply_cap(self, array_bytes: int, members: int = 0) -> int:
        """The most bytes its serialized reply may have: the declared arrays' raw bytes × ARRAY_SLACK, plus the
        phase's allowance for metrics and config and MEMBER_ALLOWANCE for each of `members` packed models."""
        return math.ceil(array_bytes * ARRAY_SLACK) + self.reply_allowance + MEMBER_ALLOWANCE * members

    @property
    def is_weights(self) -> bool:
        """Whether its reply is the model it was sent, trained (a Flower `train` message)."""
        return self.message_type == TRAIN

    def member(self, index: int) -> str:
        """The name of numbered model `index` (`expert-3`)."""
        if self.numbered is None:
            raise ValueError(f"phase {self.name} has no numbered models")
        return self.numbered.format(index)

    def member_index(self, member: str) -> int:
        """Inverse of `member`."""
        assert self.numbered is not None
        head, _, tail = self.numbered.partition("{}")
        return int(member.removeprefix(head).removesuffix(tail))

    def best_groups(self, count: int = 0) -> dict[str, BestGroup]:
        """The groups whose best rounds are kept apart: one per member (`count` numbered ones), else one."""
        if self.members:
            return {m: BestGroup(f"{m}.", member_metric(VAL_LOSS, m), member_metric(VAL_N, m)) for m in self.members}
        if self.numbered is not None:
            return {
                str(i): BestGroup(f"{self.member(i)}.", member_metric(VAL_LOSS, i), member_metric(VAL_N, i))
                for i in range(count)
            }
        return {"": BestGroup("", VAL_LOSS, VAL_N)}

    def check_sent(self, records: Iterable[str], config: Iterable[str] = ()) -> None:
        """Raise ValueError unless a server message of this phase carries only declared records and config keys
        (beyond the base entries: run-id, phase, server-round and the Facts)."""
        records, config = set(records) - {p.CONFIG}, set(config)
        if not records <= set(self.sends) or not config <= set(self.config_keys):
            raise ValueError(
                f"phase {self.name}: records {sorted(records - set(self.sends))} / config keys "
                f"{sorted(config - set(self.config_keys))} are not declared (common/federation/phases.py: sends "
                f"{list(self.sends)}, config keys {list(self.config_keys)})"
            )

    def allows_metric(self, name: str) -> bool:
        """Whether a metric of this name may leave a site in this phase's replies."""
        return any(re.fullmatch(pattern, name) for pattern in self.metrics)

    def allows_array(self, name: str) -> bool:
        """Whether an array of this name may leave a site in this phase's `reply_arrays` record."""
        return any(re.fullmatch(pattern, name) for pattern in self.array_names)


def _weights(
    name: str,
    sends: tuple[str, ...] = (),
    config: tuple[str, ...] = (),
    members: tuple[str, ...] = (),
    numbered: str | None = None,
    extra_metrics: tuple[str, ...] = (),
) -> Phase:
    if members:
        keys = "|".join(re.escape(m) for m in members)
    elif numbered is not None:
        keys = r"\d+"
    else:
        keys = ""
    names = (r".+",)  # any name of the model the server sent; `egress.weights_reply` pins names, shapes and dtypes
    per_member = (rf"({re.escape(VAL_LOSS)}|{re.escape(VAL_N)}|{re.escape(TRAIN_LOSS)})-({keys})",) if keys else ()
    return Phase(
        name,
        TRAIN,
        (ROUND_OFFSET, PROXIMAL_MU, *config),
        (p.ARRAYS, *sends),
        p.ARRAYS,
        names,
        _TRAINING_METRICS + per_member + extra_metrics,
        members=members,
        numbered=numbered,
    )


HANDSHAKE = Phase(
    "handshake",
    f"{QUERY}.handshake",
    metrics=(
        r"n-(train|val|test)",
        r"n-(train|val|test)-class-\d+",
        re.escape(ENCODER_DIM),
        re.escape(TOKEN_GRID),
        re.escape(CHILD_GRID),
    ),
    reply_arrays=p.STATS,
    array_names=tuple(
        re.escape(name)
        for name in (FEATURE_SUMS, FEATURE_SQUARES, FEATURE_COUNTS, CLINICAL_SUMS, CLINICAL_SQUARES, CLINICAL_COUNTS)
        + (OOD_SUMS, OOD_SQUARES, OOD_COUNTS)
    ),
    reply_config=p.SITE,
    reply_config_values=HANDSHAKE_CONFIG,
    # its metrics (3 grids, 3 splits × (1 + MAX_CLASSES) counts) and its config at their bounds
    reply_allowance=REPLY_ALLOWANCE
    + METRIC_BYTES * (3 + 3 * (1 + MAX_CLASSES))
    + sum(value.max_bytes for _, value in HANDSHAKE_CONFIG),
)
ADAPTER = _weights("adapter")
# pixel-level LRMIL stage 1: the sites' initial trainable encoder parameters, their FedAvg rounds (only names of
# the `encoder.` form may leave; `egress.weights_reply` pins them to the arrays sent, and the site sends exactly the
# parameters its own config trains), then re-encoding with the global encoder (only counts leave); the VIB
# objective also sends its fine-tuning head (`head.`); its instance selection never leaves the site
PIXEL_STAGE1_INIT = Phase(
    "pixel-stage1-init",
    f"{QUERY}.pixel_stage1_init",
    reply_arrays=p.ARRAYS,
    array_names=(ENCODER_ARRAY, HEAD_ARRAY),
    metrics=(re.escape(NUM_EXAMPLES),),
    step="pixel-stage1",
)
PIXEL_STAGE1 = dataclasses.replace(_weights("pixel-stage1"), array_names=(ENCODER_ARRAY, HEAD_ARRAY))
PIXEL_STAGE1_REENCODE = Phase(
    "pixel-stage1-reencode",
    f"{QUERY}.pixel_stage1_reencode",
    sends=(p.ARRAYS,),
    metrics=(re.escape(REENCODED), re.escape(NUM_EXAMPLES), re.escape(SECONDS)),
)
TEACHER = _weights("teacher", (STANDARDIZE,), members=("teacher", "baseline"))  # the low-res baseline rides along
CLUSTER_INIT = Phase(
    "cluster-init",
    f"{QUERY}.cluster_init",
    (TEACHER_FINGERPRINT,),
    (p.TEACHER, STANDARDIZE),
    p.STATS,
    (SUMS, COUNTS),
    (re.escape(N_TRAIN), re.escape(EMBEDDING_DIM)),
    step="clusters",
)
CLUSTER_STATS = Phase(
    "cluster-stats",
    f"{QUERY}.cluster_stats",
    (TEACHER_FINGERPRINT,),
    (p.CENTROIDS, STANDARDIZE),
    p.STATS,
    (SUMS, COUNTS),
    (re.escape(N_TRAIN), re.escape(MOVED)),
    step="clusters",
)
EXPERTS = _weights(
    "experts",
    (p.CENTROIDS, STANDARDIZE),
    (TEACHER_FINGERPRINT,),
    numbered="expert-{}",
    extra_metrics=(rf"{re.escape(N_EXPERT)}-\d+",),
)
KD_CACHE = Phase(
    "kd-cache",
    f"{QUERY}.kd_cache",
    (TEACHER_FINGERPRINT,),
    (p.TEACHER, p.ADAPTER, p.EXPERTS, p.CENTROIDS, STANDARDIZE),
    metrics=(re.escape(N_TRAIN), re.escape(NUM_EXAMPLES), re.escape(SECONDS)),
)
STUDENT = _weights("student")
# the bidirectional-distillation (BD) model on the student's instances + clinical rows (`[federation.clinical]`):
# exactly the BD arrays it was sent (shared slide encoder `slide.`, branches `multi.` / `single.`), `multi.` averaged
# with each site's clinical-slide count (server.clinical_strategy); sent with the final adapter and the pooled
# clinical normalisation (record CLINICAL_NORM: mean, std of the handshake's clinical sums)
N_CLINICAL = "n-clinical"  # a site's training slides with a complete clinical row (weight of `multi.`)
CLINICAL_NORM, BD_MODEL = "clinical-norm", "bd"  # records: pooled clinical normalisation; the final BD model
BD_ARRAYS = r"(slide|multi|single)\.\w+(\.\w+)*"  # the BD model's state-dict names, nothing else
# the final evaluation's BD rows: test slides read with their clinical data as recorded / with all of it removed
BD_EVALUATED = ("bd_clinical", "bd_no_clinical")
BD_WITH_CLINICAL = "bd-with-clinical"  # a site's evaluated slides with a complete clinical row
CLINICAL = Phase(
    "clinical",
    TRAIN,
    (ROUND_OFFSET,),
    (p.ARRAYS, p.ADAPTER, CLINICAL_NORM),
    p.ARRAYS,
    (BD_ARRAYS,),
    tuple(re.escape(k) for k in (NUM_EXAMPLES, UNIT_WEIGHT, N_CLINICAL, TRAIN_LOSS, VAL_LOSS, VAL_N, EPOCHS, SECONDS)),
)
LOGITS = Phase(
    "logits",
    f"{QUERY}.logits",
    (TEACHER_FINGERPRINT,),
    (p.TEACHER, p.PROXY, p.EXPERTS, p.CENTROIDS, STANDARDIZE),
    p.LOGITS_RECORD,
    (TEACHER_LOGITS, EXPERT_LOGITS, EXPERT_WEIGHTS),
    (re.escape(N_TRAIN), re.escape(PROXY_N), re.escape(SECONDS)),
    step="student",
)
# the final models' summed val NLL over the temperature grid (sites below suppress-below val slides send val-n 0)
CALIBRATE = Phase(
    "calibrate",
    f"{QUERY}.calibrate",
    sends=(p.TEACHER, p.STUDENT, p.ADAPTER, STANDARDIZE),
    metrics=(
        rf"nll-({'|'.join(CALIBRATED_MODELS)})-({'|'.join(str(k) for k in range(len(TEMPERATURES)))})",
        re.escape(VAL_N),
    ),
)
EVALUATION = Phase(
    "evaluate",
    EVALUATE,
    (EVAL_SPLIT, STUDENT_TEMPERATURE, TEACHER_TEMPERATURE),
    (p.TEACHER, p.STUDENT, p.BASELINE, p.ADAPTER, STANDARDIZE, OOD, BD_MODEL, CLINICAL_NORM),
    metrics=(
        rf"({'|'.join(EVALUATED_MODELS)})\.({'|'.join(EVALUATION_METRICS)})",
        *per_class.policy_patterns((*EVALUATED_MODELS, *BD_EVALUATED)),  # C > 2: f1-c<k>, auc-c<k>, ece-c<k>, ...
        rf"({'|'.join(BD_EVALUATED)})\.({'|'.join(EVALUATION_METRICS)})",
        re.escape(BD_WITH_CLINICAL),
        r"cost\.(high|low)\.(patches_per_slide|seconds_per_slide)",
        re.escape(N_TEST),
        re.escape(NUM_EXAMPLES),
    ),
    config_name="final",
    reply_allowance=REPLY_ALLOWANCE
    + per_class.reply_bytes(len(EVALUATED_MODELS) + len(BD_EVALUATED), METRIC_BYTES)
    + (len(BD_EVALUATED) * len(EVALUATION_METRICS) + 1) * METRIC_BYTES,
)

ALL: tuple[Phase, ...] = (
    HANDSHAKE,
    PIXEL_STAGE1_INIT,
    PIXEL_STAGE1,
    PIXEL_STAGE1_REENCODE,
    ADAPTER,
    TEACHER,
    CLUSTER_INIT,
    CLUSTER_STATS,
    EXPERTS,
    KD_CACHE,
    STUDENT,
    LOGITS,
    CLINICAL,
    CALIBRATE,
    EVALUATION,
)
BY_NAME: dict[str, Phase] = {phase.name: phase for phase in ALL}
WEIGHTS: tuple[Phase, ...] = tuple(phase for phase in ALL if phase.is_weights)


def by_name(name: str) -> Phase:
    """The phase of this name (as in the ledger and the egress policy)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown phase {name!r}; known: {', '.join(BY_NAME)}") from None


def by_config(value: str) -> Phase:
    """The phase a message's `phase` config entry names (`final` is the evaluation)."""
    for phase in ALL:
        if phase.phase == value:
            return phase
    raise ValueError(f"unknown phase {value!r} in the message config; known: {', '.join(ph.phase for ph in ALL)}")

"""A hostile coordinator's ServerApp, shipped by tests/test_trust_malicious_coordinator.py in the server code of an
otherwise unmodified app bundle (a site vets only the FAB's client code, `common.flower_app.vet_fab`, so a coordinator
may run any ServerApp it likes against the sites' installed ClientApp).

It sends what a careless or compromised coordinator could, and writes every reply it got (error code and reason, or
the metrics, configs and arrays) to `<runs-dir>/hostile-<run-id>.json` for the test to read:

- the handshake (which, below the site's floors, is refused: then it stops there);
- a handshake with a run id that escapes `runs/` (`../…`) and one that is an absolute path;
- requests for what no phase declares: extra config keys asking for features, a `train` message of a phase named
  `features`, a message type with no site step (`query.features`);
- cluster statistics differencing, by an omniscient attacker that reads the teacher outputs the site cached at
  cluster-init (same host) and crafts, per site, two centroid sets whose size-constrained assignments differ by one
  slide (`target`) in cluster 0. Without clipping and noise, release 1 minus release 2 of cluster 0 is that slide's
  vector.

Where the sites live is read from `hostile_plan.toml` beside this module in the FAB (`sites`: site name -> site
directory; `nodes`: how many sites to wait for).
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedslide.client.local_phases import TEACHER_OUTPUTS, local_assignment
from fedslide.client.site_run import SiteRun
from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.stages import cluster_vectors
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.models import fingerprint, new_model, teacher_config, to_record
from fedslide.common.flower_compat import shorten_object_pulls

app = ServerApp()

PLAN = "hostile_plan.toml"
TIMEOUT = 120.0


def _record(reply: Message) -> dict[str, Any]:
    """What the coordinator received in one reply."""
    out: dict[str, Any] = {"node": int(reply.metadata.src_node_id)}
    if reply.has_error():
        out["error"] = {"code": int(reply.error.code), "reason": str(reply.error.reason)}
        return out
    content = reply.content
    out["configs"] = {name: dict(rec) for name, rec in content.config_records.items()}
    out["metrics"] = {name: dict(rec) for name, rec in content.metric_records.items()}
    out["arrays"] = {
        name: {key: rec[key].numpy().tolist() for key in rec} for name, rec in content.array_records.items()
    }
    return out


def _ask(grid: Grid, nodes: list[int], message_type: str, contents: dict[int, RecordDict]) -> list[Message]:
    messages = [Message(content=contents[n], dst_node_id=n, message_type=message_type) for n in nodes]
    return list(grid.send_and_receive(messages, timeout=TIMEOUT))


def _config(**entries: Any) -> RecordDict:
    return RecordDict({p.CONFIG: ConfigRecord(entries)})


def _crafted_centroids(site: SiteRun, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Two centroid sets (C = 2) under which the site's own assignment puts {a} then {a, target} in cluster 1, so
    cluster 0 loses exactly `target`; None when no direction works.

    Centroid 0 is the mean m, centroid 1 is m + t·u for the direction u = v_a − m: a slide prefers centroid 1 when
    its projection on u exceeds t·|u|²/2, so t picks how many of the top projections go to cluster 1."""
    m = vectors.mean(0)
    for a in np.argsort(-np.linalg.norm(vectors - m, axis=1)):
        u = vectors[a] - m
        projection = (vectors - m) @ u
        order = np.argsort(-projection)
        if order[0] != a or len(order) < 3:
            continue
        first_cut = (projection[order[0]] + projection[order[1]]) / 2
        second_cut = (projection[order[1]] + projection[order[2]]) / 2
        first, second = (np.stack([m, m + (2 * cut / float(u @ u)) * u]) for cut in (first_cut, second_cut))
        one, two = local_assignment(site, vectors, first), local_assignment(site, vectors, second)
        target = int(order[1])
        if set(np.flatnonzero(one == 1)) == {a} and set(np.flatnonzero(two == 1)) == {a, target}:
            return first, second, target
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Send the hostile messages; write what came back."""
    shorten_object_pulls()
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    assert cfg.runs_dir is not None and cfg.run_id is not None
    runs_dir = Path(cfg.runs_dir)
    plan = tomllib.loads(Path(__file__).with_name(PLAN).read_text())
    seen: dict[str, Any] = {}
    out = runs_dir / f"hostile-{cfg.run_id}.json"
    try:
        _attack(grid, cfg, plan, seen, runs_dir)
    finally:
        runs_dir.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(seen, indent=1))


def _attack(grid: Grid, cfg: FederationConfig, plan: dict[str, Any], seen: dict[str, Any], runs_dir: Path) -> None:
    assert cfg.run_id is not None
    nodes: list[int] = []
    deadline = time.monotonic() + TIMEOUT
    while len(nodes) < int(plan["nodes"]) and time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.2)
    handshake = ph.HANDSHAKE

    def ask_all(step: str, message_type: str, content: RecordDict) -> list[Message]:
        replies = _ask(grid, nodes, message_type, dict.fromkeys(nodes, content))
        seen[step] = [_record(r) for r in replies]
        return replies

    # the handshake; a site below its floors refuses here, and a hostile coordinator has nothing more to ask
    replies = ask_all(
        "handshake", handshake.message_type, _config(**{ph.RUN_ID: cfg.run_id, ph.PHASE: handshake.phase})
    )
    answered = [r for r in replies if not r.has_error()]
    if not answered:
        return

    # (a) run ids that escape runs/
    for step, run_id in (("escape-relative", "../escaped"), ("escape-absolute", str(runs_dir.parent / "escaped"))):
        ask_all(step, handshake.message_type, _config(**{ph.RUN_ID: run_id, ph.PHASE: handshake.phase}))
    site = answered[0].content.config_records[p.SITE]
    counts = answered[0].content.metric_records[p.METRICS]
    facts = p.Facts(
        tuple(p.strings(site, ph.CLASSES)),
        p.integer(counts, ph.ENCODER_DIM),
        p.integer(counts, ph.TOKEN_GRID),
        p.integer(counts, ph.CHILD_GRID),
        str(site[ph.ENCODER_NAME]),
    )
    names = {int(r.metadata.src_node_id): str(r.content.config_records[p.SITE][ph.SITE_NAME]) for r in answered}
    seen["names"] = {str(n): name for n, name in names.items()}
    base = {ph.RUN_ID: cfg.run_id, ph.SERVER_ROUND: 1, **facts.to_config()}

    # (b) what no phase declares: extra config keys, a phase named `features`, a message type without a site step
    asking = {"records": "features,bags,slide-ids", "send-features": True, "return": "coords"}
    ask_all("undeclared-keys", handshake.message_type, _config(**{**base, ph.PHASE: handshake.phase, **asking}))
    ask_all("undeclared-phase", ph.TRAIN, _config(**{**base, ph.PHASE: "features"}))
    ask_all("undeclared-type", f"{ph.QUERY}.features", _config(**{**base, ph.PHASE: "features"}))

    # (b') error text: a cluster-statistics request for a teacher the site never saw, with centroids of the wrong
    # width; the site's exception names its own cache paths, its reply may carry only a code and a fixed text
    wrong = RecordDict(
        {
            p.CONFIG: ConfigRecord({**base, ph.PHASE: ph.CLUSTER_STATS.phase, ph.TEACHER_FINGERPRINT: "f" * 16}),
            p.CENTROIDS: ArrayRecord({ph.CENTROIDS: Array(np.zeros((2, 3), dtype=np.float64))}),
        }
    )
    ask_all("error-text", ph.CLUSTER_STATS.message_type, wrong)

    # (c) cluster statistics differencing
    teacher = to_record(new_model(teacher_config(cfg, facts), cfg.seed))
    tfp = fingerprint(teacher)
    init = RecordDict(
        {
            p.CONFIG: ConfigRecord({**base, ph.PHASE: ph.CLUSTER_INIT.phase, ph.TEACHER_FINGERPRINT: tfp}),
            p.TEACHER: teacher,
        }
    )
    ask_all("cluster-init", ph.CLUSTER_INIT.message_type, init)
    crafted: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    targets: dict[str, Any] = {}
    for node, name in names.items():
        site_dir = Path(plan["sites"][name])
        site_run = SiteRun(site_dir, site_dir / "runs" / cfg.run_id, cfg, name)
        outputs = site_run.load(TEACHER_OUTPUTS, tfp)  # the attacker reads what the site cached (same host)
        if outputs is None:
            targets[name] = {"problem": f"no {TEACHER_OUTPUTS} of teacher {tfp} in {site_run.run_dir}"}
            continue
        vectors = cluster_vectors(cfg.clusters.features, outputs["logits"], outputs["embedding"])
        found = _crafted_centroids(site_run, vectors)
        if found is None:
            targets[name] = {"problem": f"no pair of its {len(vectors)} slides gives the wanted assignments"}
            continue
        first, second, target = found
        crafted[node] = (first, second)
        targets[name] = {"index": target, "vector": vectors[target].tolist()}
    seen["targets"] = targets
    for i in (0, 1):
        contents = {
            n: RecordDict(
                {
                    p.CONFIG: ConfigRecord(
                        {**base, ph.SERVER_ROUND: i + 1, ph.PHASE: ph.CLUSTER_STATS.phase, ph.TEACHER_FINGERPRINT: tfp}
                    ),
                    p.CENTROIDS: ArrayRecord({ph.CENTROIDS: Array(np.asarray(crafted[n][i], dtype=np.float64))}),
                }
            )
            for n in crafted
        }
        replies = _ask(grid, sorted(crafted), ph.CLUSTER_STATS.message_type, contents)
        seen[f"cluster-stats-{i + 1}"] = [_record(r) for r in replies]

"""configs/pipeline.yaml through the CLI: the demo's summary shows its stages and every task;
``dq-run trace`` prints a root's tree; ``dq-run cancel`` dead-letters a pipeline's queued tasks,
and replaying them resumes it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.run_kit import run


def _env(tmp_path: Path) -> dict[str, str]:
    return {"DQ_BROKER__PATH": str(tmp_path / "pipeline.db"), "DQ_LOGGING__FORMAT": "json"}


def _published_id(result_stdout: str) -> str:
    return result_stdout.strip().split()[-1]


def test_the_pipeline_demo_runs_every_stage(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    result = run(
        "configs/pipeline.yaml", "--summary-json", str(summary), timeout=60, **_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    by_type = json.loads(summary.read_text())["by_type"]
    done = {name: row["succeeded"] for name, row in by_type.items()}
    assert done == {"fetch_order": 5, "resize": 15, "contact_sheet": 5, "notify": 5}
    assert by_type["contact_sheet"]["published"] == 5
    assert "stage: fetch_order -> resize (each images), notify; on_dead -> refund" in result.stdout
    assert "stage: resize -> contact_sheet (join)" in result.stdout


def test_trace_and_cancel_of_a_pipeline(tmp_path: Path) -> None:
    env = _env(tmp_path)
    published = run(
        "publish", "configs/pipeline.yaml", "fetch_order", '{"order": 7, "images": 2}', **env
    )
    assert published.returncode == 0, published.stderr
    root = _published_id(published.stdout)

    # Cancelled before it ran: the root itself is dead-lettered, and trace says so.
    cancelled = run("cancel", "configs/pipeline.yaml", root, **env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "1 queued task(s) dead-lettered" in cancelled.stdout
    traced = run("trace", "configs/pipeline.yaml", root, "--json", **env)
    assert traced.returncode == 0, traced.stderr
    (tree,) = json.loads(traced.stdout)
    assert (tree["id"], tree["type"], tree["state"]) == (root, "fetch_order", "dead (cancelled)")

    # Replayed: the cancel is lifted and the whole pipeline runs.
    replayed = run("dlq", "replay", "configs/pipeline.yaml", root, **env)
    assert replayed.returncode == 0, replayed.stderr
    ran = run("run", "configs/pipeline.yaml", "--no-simulate", "--until-empty", **env)
    assert ran.returncode == 0, ran.stderr
    traced = run("trace", "configs/pipeline.yaml", root, **env)
    assert traced.returncode == 0, traced.stderr
    lines = traced.stdout.splitlines()
    assert lines[0].startswith("fetch_order ") and " succeeded attempts=1" in lines[0]
    kinds = sorted(line.split()[1] for line in lines[1:])
    assert kinds == ["contact_sheet", "notify", "resize", "resize"]
    assert all(" succeeded " in line for line in lines)

    missing = run("trace", "configs/pipeline.yaml", "no-such-root", **env)
    assert missing.returncode == 1
    assert "nothing known of pipeline no-such-root" in missing.stderr

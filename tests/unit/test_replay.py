import pytest

from driftloop.replay import ScenarioError, parse_scenario, traffic
from tests.conftest import free_port, run_cli


def test_scenarios():
    assert parse_scenario("clean") == ("noise", 0)
    assert parse_scenario("corrupt:blur:4") == ("blur", 4)
    for bad, msg in [("noisy", "use 'clean' or"), ("corrupt:fog:3", "unknown corruption 'fog'"),
                     ("corrupt:noise:9", "severity must be 0..5"), ("corrupt:noise:x", "must be an integer")]:
        with pytest.raises(ScenarioError, match=msg):
            parse_scenario(bad)


def test_traffic_rows():
    df, feats, label = traffic("digits", "corrupt:noise:3", 50, seed=1)
    assert len(df) == 50 and len(feats) == 64 and label == "digit"
    df, feats, label = traffic("rainfall", "clean", 30)
    assert len(df) == 30 and df["day"].is_monotonic_increasing and label == "rain"
    with pytest.raises(ScenarioError, match="time-ordered"):
        traffic("rainfall", "corrupt:noise:1", 10)


def test_cli_replay_bad_scenario_is_one_line():
    r = run_cli("replay", "digits", "--scenario", "corrupt:fog:2", "--rows", "5")
    assert r.returncode == 2 and r.stderr.strip() == "error: scenario 'corrupt:fog:2': unknown corruption 'fog' (one of noise, blur, contrast, shift, dropout)"


def test_a_batched_replay_sends_each_answers_labels_as_one_request_and_counts_each_status():
    """Ten-row requests: each answer's ten labels go to /feedback as one batch (not ten requests), with delayed
    labels the ones still owed go at the end as one batch, and `labelled` counts the labels answered 200."""
    import asyncio
    import threading
    import time

    import pandas as pd
    import uvicorn
    from fastapi import FastAPI, Request

    from driftloop.replay import replay_async

    bodies: list[dict] = []
    app = FastAPI()

    @app.post("/m/predict")
    async def predict(req: Request):
        rows = (await req.json())["rows"]
        return {"model_version": 1, "predictions": [{"id": f"r{int(r['x'])}", "prediction": int(r["x"]) % 2} for r in rows]}

    @app.post("/m/feedback")
    async def feedback(req: Request):
        body = await req.json()
        bodies.append(body)  # one id refused (never monitored), as the app answers it
        return {"results": [{"request_id": it["request_id"], "status": 404 if it["request_id"] == "r3" else 200}
                            for it in body["labels"]]}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        df = pd.DataFrame({"x": range(40), "y": [i % 2 for i in range(40)]})
        url = f"http://127.0.0.1:{port}"
        rep = asyncio.run(replay_async(url, "m", df, ["x"], "y", rps=0, labels=True, batch=10, concurrency=1))
        assert rep.ok == 40 and rep.correct == 40
        assert [len(b["labels"]) for b in bodies] == [10, 10, 10, 10] and rep.labelled == 39
        bodies.clear()
        rep = asyncio.run(replay_async(url, "m", df, ["x"], "y", rps=0, labels=True, batch=10, concurrency=1, label_delay=15))
        assert [len(b["labels"]) for b in bodies] == [5, 10, 10, 15] and rep.labelled == 39
        sent = [it["request_id"] for b in bodies for it in b["labels"]]
        assert sent == [f"r{i}" for i in range(40)] and all(it["label"] in (0, 1) for b in bodies for it in b["labels"])
    finally:
        server.should_exit = True

"""bench.gram runs (here under the Triton interpreter, tiny): both variants timed, the
kernel's result close to torch's, one JSON written."""
import json

from bench.gram import main


def test_gram_bench_smoke(tmp_path):
    main(["--dims", "20,33", "--reps", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("gram-cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["dim"], r["variant"]) for r in rows} == {(d, v) for d in (20, 33)
                                                         for v in ("torch x @ x.mT", "catapult gram")}
    assert all(r["median_ms"] > 0 for r in rows)
    assert all(r["max_rel_difference"] < 2 ** -7 for r in rows)  # within a bfloat16 ulp of torch's

"""Policy decision cost with 1,000 glob resource rules and 1,000 humans (in process, no I/O).

    .venv/bin/python bench/policy_decision.py [--rules 1000] [--humans 1000] [--decisions 20000]

Builds one policy as text (resource rules spread over 50 services, each rule a glob; humans each
granted a handful of them; the request's rule sits late in file order), loads it with the
broker's own loader, and times `evaluate` (every layer, as a request runs it) one decision at a
time with `perf_counter_ns`. A linear first-match scan over the same rules is timed alongside,
interleaved, to show what the prefix index saves. Prints JSON; `make bench` imports `measure`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.policy import RequestFacts, ScopeEntry, SessionFacts, load_policy_text
from broker.policy.evaluate import evaluate
from broker.policy.resources import compile_glob, is_glob

SERVICES = 50


def policy_text(rules: int, humans: int) -> tuple[str, list[str], list[str]]:
    """The policy, the resources its rules cover (one per rule), and the humans' emails."""
    lines = ["version: 1", "tiers:", "  read: {control: auto, max_ttl: 1h}", "resources:"]
    targets = []
    for i in range(rules):
        service = f"svc{i % SERVICES}"
        match = f"jwt://{service}/r{i}/*" if i % 2 else f"jwt://{service}/r{i}-*"
        targets.append(match.replace("*", "item"))
        lines += [f'  - match: "{match}"', "    provider: native", "    access:", "      read: {tier: read}"]
    lines.append("humans:")
    emails = []
    for h in range(humans):
        email = f"user{h}@example.com"
        emails.append(email)
        lines += [f"  {email}:", "    grants:"]
        for k in range(5):  # five services each, and every service granted to someone
            lines.append(f'      - {{resource: "jwt://svc{(h + k * 7) % SERVICES}/**", access: [read]}}')
    lines += ["agents:", "  claude-code: {max_tier: read}",
              "budgets: {max_issued_per_session: 100000, max_active_per_session: 100000}"]
    return "\n".join(lines) + "\n", targets, emails


def measure(rules: int = 1000, humans: int = 1000, decisions: int = 20000) -> dict[str, Any]:
    text, targets, _emails = policy_text(rules, humans)
    policy = load_policy_text(text)
    now = datetime.now(UTC)
    rng = random.Random(7)
    # Requests for resources in the last tenth of the file (a scan would try most rules first),
    # by humans whose grants cover them (so every layer runs and the answer is allow).
    late = targets[rules * 9 // 10:]
    cases = []
    for _ in range(200):
        resource = rng.choice(late)
        service = resource.split("/")[2]
        n = int(service.removeprefix("svc"))
        email = f"user{rng.randrange(humans // SERVICES) * SERVICES + n}@example.com"  # h % 50 == n: granted
        session = SessionFacts(session_id="ses_bench", human=email, agent="claude-code", task_id="bench",
                               scope=(ScopeEntry(f"jwt://{service}/**", ("read",)),), status="active",
                               expires_at=now + timedelta(hours=1))
        cases.append((session, RequestFacts(resource=resource, access="read", ttl_seconds=600, now=now)))
    ordered = list(policy.resources)

    def linear(resource: str) -> Any:
        for rule in ordered:
            if (compile_glob(rule.match).matches(resource) if is_glob(rule.match) else rule.match == resource):
                return rule
        return None

    compiled = {rule.match: compile_glob(rule.match) for rule in ordered if is_glob(rule.match)}

    def linear_precompiled(resource: str) -> Any:
        for rule in ordered:
            glob = compiled.get(rule.match)
            if (glob.matches(resource) if glob is not None else rule.match == resource):
                return rule
        return None

    for session, request in cases[:50]:  # warm up
        evaluate(policy, session, request)
    decide_ns, index_ns, scan_ns = [], [], []
    results = {"allow": 0, "deny": 0, "approval_required": 0}
    for k in range(decisions):
        session, request = cases[k % len(cases)]
        t0 = time.perf_counter_ns()
        decision = evaluate(policy, session, request)
        t1 = time.perf_counter_ns()
        decide_ns.append(t1 - t0)
        results[decision.result] += 1
        if k % 10 == 0:  # the matcher alone, index vs scan, interleaved
            t0 = time.perf_counter_ns()
            found = policy.match_resource(request.resource)
            t1 = time.perf_counter_ns()
            scanned = linear_precompiled(request.resource)
            t2 = time.perf_counter_ns()
            assert found is scanned, request.resource  # the index keeps first match in file order
            index_ns.append(t1 - t0)
            scan_ns.append(t2 - t1)
    assert linear(cases[0][1].resource) is policy.match_resource(cases[0][1].resource)

    def q(values: list[int], pct: float) -> float:
        s = sorted(values)
        return round(s[min(len(s) - 1, int(len(s) * pct))] / 1000, 2)

    return {"rules": rules, "humans": humans, "decisions": decisions, "results": results,
            "decision_p50_us": q(decide_ns, 0.5), "decision_p99_us": q(decide_ns, 0.99),
            "decision_mean_us": round(statistics.fmean(decide_ns) / 1000, 2),
            "resource_match_index_p50_us": q(index_ns, 0.5), "resource_match_scan_p50_us": q(scan_ns, 0.5)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--humans", type=int, default=1000)
    ap.add_argument("--decisions", type=int, default=20000)
    args = ap.parse_args()
    print(json.dumps(measure(args.rules, args.humans, args.decisions), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Builds compare.md, compare.json and sweep.png from a compare.sh results
directory (runs in the compare venv: matplotlib is installed there).

  report.py RESULTS_DIR

Reads meta.json, runs/<impl>-<name>.{json,txt,status.json} (impl: rust,
python or centrifugo; name: a scenario or sweep-<N>) and
protocol-<impl>.json; prints compare.md on stdout.
"""

import json
import os
import sys

HIGHER, LOWER = "higher", "lower"
PY = "Python 3.1.0"
CF = "Centrifugo"


def load_json(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def tail(path, n=6):
    try:
        with open(path) as f:
            lines = [line.rstrip() for line in f if line.strip() and not line.startswith("[bench]")]
    except OSError:
        return []
    return lines[-n:]


def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1000:
        s = "{:,.0f}".format(v)
    elif a >= 100:
        s = "{:.0f}".format(v)
    elif a >= 10:
        s = "{:.1f}".format(v)
    elif a >= 1:
        s = "{:.2f}".format(v)
    else:
        s = "{:.3g}".format(v)
    return s + unit


def esc(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- one side


class Side:
    def __init__(self, results, impl, name):
        base = os.path.join(results, "runs", "{}-{}".format(impl, name))
        self.impl = impl
        self.name = name
        self.status = load_json(base + ".status.json") or {}
        self.report = load_json(base + ".json")
        self.txt = base + ".txt"
        self.log = os.path.join(results, "logs", "{}-{}.log".format(impl, name))
        self.ran = self.status != {}

    def broker_lost(self):
        """The server's log says it lost RabbitMQ during the run."""
        pattern = "RabbitMQ unavailable" if self.impl == "rust" else "Exception in connection with rabbitmq"
        try:
            with open(self.log, errors="replace") as f:
                return sum(1 for line in f if pattern in line)
        except OSError:
            return 0

    def incomplete_steps(self):
        """(run, step) of steps with deliveries missing or not drained."""
        return [(r, st) for r in self.runs for st in r.get("steps", [])
                if st.get("lost") or not st.get("drained", True)]

    @property
    def runs(self):
        return (self.report or {}).get("runs", [])

    @property
    def ok(self):
        return bool(self.report and self.report.get("ok"))

    def errors(self):
        out = {}
        for run in self.runs:
            for k, v in (run.get("errors") or {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def problems(self):
        return (self.report or {}).get("problems", [])

    def failure(self):
        """Why there is no usable result, or None."""
        if not self.ran:
            return "not run"
        if self.report is None:
            reason = self.status.get("reason") or "no JSON result (exit {})".format(self.status.get("rc"))
            lines = tail(self.txt, 3)
            return reason + (": " + " / ".join(lines) if lines and not self.status.get("timed_out") else "")
        return None

    def summary(self):
        return {
            "status": self.status,
            "ok": self.ok if self.report else None,
            "problems": self.problems(),
            "errors": self.errors(),
            "summary": (self.report or {}).get("summary"),
            "failure": self.failure(),
        }


# ---------------------------------------------------------------- metrics


def run_by_name(side):
    return {r.get("name"): r for r in side.runs}


def step_by_name(run):
    return {s.get("name"): s for s in (run or {}).get("steps", [])}


def g(d, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def detail_rows(rust, python, other="Python"):
    """(metric, better, rust value, other value, note) for every run and step
    (other: Python, or Centrifugo)."""
    rows = []
    rr, pr = run_by_name(rust), run_by_name(python)
    names = list(rr) + [n for n in pr if n not in rr]
    for name in names:
        a, b = rr.get(name), pr.get(name)
        rows.append(("{}: connections/s".format(name), HIGHER,
                     g(a, "connections", "per_second"), g(b, "connections", "per_second"), ""))
        rows.append(("{}: subscribes/s".format(name), HIGHER,
                     g(a, "subscriptions", "per_second"), g(b, "subscriptions", "per_second"), ""))
        rows.append(("{}: RSS bytes/connection".format(name), LOWER,
                     g(a, "server", "bytes_per_connection"), g(b, "server", "bytes_per_connection"), ""))
        ka, kb = g(a, "server", "rss_max_kib"), g(b, "server", "rss_max_kib")
        rows.append(("{}: server RSS max MiB".format(name), LOWER,
                     ka / 1024 if ka is not None else None, kb / 1024 if kb is not None else None, ""))
        if g(a, "slow_clients") or g(b, "slow_clients"):
            def closed(run):
                sc = g(run, "slow_clients")
                return "{}/{}".format(sc.get("closed_by_server"), sc.get("count")) if sc else None
            rows.append(("{}: slow clients closed by the server".format(name), None, closed(a), closed(b), ""))
        if g(a, "server", "hold_seconds") or g(b, "server", "hold_seconds"):
            rows.append(("{}: idle CPU %".format(name), LOWER,
                         g(a, "server", "idle_cpu_percent"), g(b, "server", "idle_cpu_percent"), ""))
        sa, sb = step_by_name(a), step_by_name(b)
        for step in list(sa) + [s for s in sb if s not in sa]:
            x, y = sa.get(step), sb.get(step)
            note = []
            for label, st in (("Rust", x), (other, y)):
                if st and (st.get("lost") or st.get("duplicated") or st.get("unexpected") or not st.get("drained", True)):
                    note.append("{}: lost {}, dup {}, unexp {}{}".format(
                        label, st.get("lost"), st.get("duplicated"), st.get("unexpected"),
                        "" if st.get("drained", True) else ", not drained"))
            note = "; ".join(note)
            pre = "{} / {}".format(name, step)
            if (x and x.get("target_rate") is None) or (y and y.get("target_rate") is None):
                rows.append((pre + ": triggers/s confirmed by RabbitMQ", None, g(x, "trigger_rate"),
                             g(y, "trigger_rate"),
                             "publisher side (RabbitMQ's confirms, not the server's work): no winner"))
            rows.append((pre + ": deliveries/s", HIGHER, g(x, "deliveries_per_second"),
                         g(y, "deliveries_per_second"), note))
            rows.append((pre + ": p50 ms", LOWER, g(x, "latency_ms", "p50"), g(y, "latency_ms", "p50"), ""))
            rows.append((pre + ": p99 ms", LOWER, g(x, "latency_ms", "p99"), g(y, "latency_ms", "p99"), ""))
            rows.append((pre + ": server CPU µs/trigger", LOWER, g(x, "server_cpu_us_per_trigger"),
                         g(y, "server_cpu_us_per_trigger"), ""))
    return rows


def headline(side):
    """The brief's metrics, one figure each for a side."""
    runs = side.runs
    if not runs:
        return {}
    first = runs[0]
    steps = [s for r in runs for s in r.get("steps", [])]
    out = {
        "connections/s": g(first, "connections", "per_second"),
        "RSS bytes/connection": g(first, "server", "bytes_per_connection"),
        "subscribes/s": g(first, "subscriptions", "per_second"),
    }
    if steps:
        dps = [s.get("deliveries_per_second") for s in steps if s.get("deliveries_per_second") is not None]
        out["deliveries/s (best step)"] = max(dps) if dps else None
        last = first.get("steps", [None])[-1] if first.get("steps") else None
        out["p50 ms (heaviest step)"] = g(last, "latency_ms", "p50")
        out["p99 ms (heaviest step)"] = g(last, "latency_ms", "p99")
        cpu = sum(s.get("server_cpu_seconds") or 0 for s in steps)
        trig = sum(s.get("triggers") or 0 for s in steps)
        have_cpu = any(s.get("server_cpu_seconds") is not None for s in steps)
        out["server CPU µs/trigger (all steps)"] = cpu * 1e6 / trig if trig and have_cpu else None
    return out


HEADLINE_BETTER = {
    "connections/s": HIGHER, "RSS bytes/connection": LOWER, "subscribes/s": HIGHER,
    "deliveries/s (best step)": HIGHER, "p50 ms (heaviest step)": LOWER, "p99 ms (heaviest step)": LOWER,
    "server CPU µs/trigger (all steps)": LOWER,
}


def ratio_cells(better, r, p):
    if r is None or p is None or not isinstance(r, (int, float)) or not isinstance(p, (int, float)):
        return None, None
    ratio = r / p if p else None
    if better is None:
        return ratio, None
    # A zero on either side (a run that measured nothing) has no ratio.
    if not r or not p:
        return ratio, None
    adv = r / p if better == HIGHER else p / r
    return ratio, adv


def adv_text(adv, other="Python"):
    if adv is None:
        return "–"
    if adv >= 1:
        return "×{} Rust".format(fmt(adv))
    return "×{} {}".format(fmt(1 / adv), other)


def python_reasons(scenario, python):
    """(reasons, blocking): why Python's figures are missing or partial;
    blocking when they are not usable at all."""
    reasons = []
    errors = python.errors()
    if any(k.startswith("unexpected reply: success") for k in errors):
        return ["3.1.0 answers a subscribe with {\"code\":\"success\"} without the requestId; the bench "
                       "matches replies by requestId, so no subscription completes (run without --python-stock: "
                       "ht_python_app.py then echoes it)"], True
    if "subscribe: no reply in time" in errors:
        # With the requestId patch, missing replies mean the server fell behind.
        reasons.append("too slow at this scale: subscribe replies did not arrive within the bench's "
                       "--subscribe-timeout ({})".format("; ".join(python.problems()[:2])))
    if scenario == "wildcard":
        for run in python.runs:
            for st in run.get("steps", []):
                if st.get("name") == "wildcard" and st.get("lost"):
                    reasons.append("3.1.0 delivers a trigger only to subscriptions of exactly the same room "
                                   "(hub.dispatch_message looks rooms up by their JSON): a trigger "
                                   "{{customer:c, warehouse:\"*\"}} reaches no {{customer:c, warehouse:N}} subscription "
                                   "({} of {} expected deliveries lost)".format(st.get("lost"), st.get("expected")))
    if python.runs:
        for run in python.runs:
            for st in run.get("steps", []):
                if st.get("duplicated"):
                    reasons.append("duplicated deliveries in {} / {}: 3.1.0 sends one copy per matching trigger "
                                   "room".format(run.get("name"), st.get("name")))
    if python.broker_lost():
        reasons.append("the server lost its RabbitMQ connection during the run (logs/python-{}.log): RabbitMQ "
                       "was stopped or restarted meanwhile; this run is not comparable, run it again".format(scenario))
    else:
        for run, st in python.incomplete_steps():
            if scenario == "wildcard" and st.get("name") == "wildcard":
                continue  # explained above
            reasons.append("too slow at this scale: in {} / {} {} of {} expected deliveries had not arrived when "
                           "the bench stopped waiting (--drain-timeout); its CPU/trigger and latency cover only what "
                           "arrived".format(run.get("name"), st.get("name"), st.get("lost"), st.get("expected")))
    f = python.failure()
    if f:
        reasons.append(f)
    elif python.report is not None and not python.ok and not reasons:
        reasons.append("incorrect: " + "; ".join(python.problems()[:4]))
    return reasons, bool(f)


# ---------------------------------------------------------------- protocol


def render_frame(f):
    if "json" in f:
        j = f["json"]
        if isinstance(j, dict):
            if "online_since" in j:
                return "status {" + ", ".join(sorted(j)) + "}"
            if isinstance(j.get("allowed_rooms"), list):
                j = dict(j, allowed_rooms=sorted(j["allowed_rooms"], key=lambda r: json.dumps(r, sort_keys=True)))
        return json.dumps(j, sort_keys=True, separators=(",", ":"))
    if "text" in f:
        return "text " + repr(f["text"])
    if "close_frame" in f:
        return "close {}".format(f["close_frame"])
    if "closed" in f:
        return "closed without a close frame"
    return json.dumps(f)


def render_case(v):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    parts = []
    if "handshake_status" in v and v["handshake_status"] != 101:
        parts.append("HTTP {}{}".format(v["handshake_status"], " → " + v["location"] if v.get("location") else ""))
    elif "handshake_error" in v:
        parts.append("handshake: " + v["handshake_error"])
    if "frames" in v:
        fr = [render_frame(f) for f in v["frames"]]
        parts.append(" ; ".join(fr) if fr else "(no frame)")
    if "then ping" in v:
        parts.append("then ping → " + render_case(v["then ping"]))
    reqs = v.get("backend_requests")
    if reqs:
        r = reqs[0]
        h = r.get("headers", {})
        hs = ", ".join("{}: {}".format(k, h[k]) for k in sorted(h) if k not in ("host",))
        more = " (+{} more requests: {})".format(len(reqs) - 1, reqs[1].get("path")) if len(reqs) > 1 else ""
        parts.append("backend {} {} [{}]{}".format(r.get("method"), r.get("path"), hs, more))
    return " · ".join(parts)


def render_delivery(v):
    got = v.get("received", [])
    ids = []
    for d in got:
        if "requestId" in d:
            ids.append("{}{}".format(json.dumps(d["requestId"]), "" if d.get("data") is not None else " (data null)"))
        else:
            ids.append("other: " + render_frame(d["other"]))
    return "→ " + (", ".join(ids) if ids else "nobody")


def protocol_rows(results):
    a = load_json(os.path.join(results, "protocol-rust.json"))
    b = load_json(os.path.join(results, "protocol-python.json"))
    if not a or not b:
        return None
    ca, cb = a["cases"], b["cases"]
    rows = []
    for key in [k for k in ca if k.startswith(("auth", "path"))]:
        rows.append((key, render_case(ca.get(key)), render_case(cb.get(key))))
    for key in ca.get("session", {}):
        rows.append(("session: " + key, render_case(ca["session"].get(key)),
                     render_case(cb.get("session", {}).get(key))))
    for key in ca.get("deliveries", {}):
        rows.append(("trigger " + key, render_delivery(ca["deliveries"][key]),
                     render_delivery(cb.get("deliveries", {}).get(key, {}))))
    rows.append(("publish frame as sent", ca.get("publish frame (raw)") or "–", cb.get("publish frame (raw)") or "–"))
    for key in ca.get("unsubscribe", {}):
        va, vb = ca["unsubscribe"][key], cb.get("unsubscribe", {}).get(key)
        if isinstance(va, list):
            va, vb = {"frames": va}, {"frames": vb or []}
        rows.append(("unsubscribe: " + key, render_case(va), render_case(vb)))
    for key in ca.get("malformed", {}):
        rows.append(("malformed: " + key, render_case(ca["malformed"][key]),
                     render_case(cb.get("malformed", {}).get(key))))
    return rows


# ---------------------------------------------------------------- sweep


def sweep_points(results, meta):
    counts = [c for c in meta.get("sweep", "").split(",") if c.strip()]
    points = []
    for n in counts:
        for impl in ("rust", "python"):
            side = Side(results, impl, "sweep-" + n)
            steps = side.runs[0].get("steps", []) if side.runs else []
            conns = g(side.runs[0], "connections", "ok") if side.runs else None
            for st in steps:
                points.append({
                    "impl": impl, "connections": int(n), "connected": conns,
                    "step": "fixed" if st.get("target_rate") else "burst", "step_name": st.get("name"),
                    "deliveries_per_second": st.get("deliveries_per_second"),
                    "p50_ms": g(st, "latency_ms", "p50"), "p99_ms": g(st, "latency_ms", "p99"),
                    "drained": st.get("drained"), "lost": st.get("lost"),
                    "server_cpu_us_per_trigger": st.get("server_cpu_us_per_trigger"),
                })
            if not steps:
                points.append({"impl": impl, "connections": int(n), "failure": side.failure() or "no steps"})
    return points


def plot(points, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"rust": "tab:orange", "python": "tab:blue"}
    labels = {"rust": "Rust gateway", "python": PY}
    styles = {"fixed": ("-", "o", "{}/s".format(meta.get("sweep_rate"))),
              "burst": ("--", "s", "burst of {}".format(meta.get("sweep_burst")))}
    for impl in ("rust", "python"):
        for step, (ls, mk, desc) in styles.items():
            pts = sorted((p for p in points if p["impl"] == impl and p.get("step") == step),
                         key=lambda p: p["connections"])
            xs = [p["connections"] for p in pts]
            for ax, key in ((ax1, "deliveries_per_second"), (ax2, "p99_ms")):
                ys = [p.get(key) for p in pts]
                xy = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if not xy:
                    continue
                ax.plot([x for x, _ in xy], [y for _, y in xy], ls, marker=mk, color=colors[impl],
                        label="{}, {}".format(labels[impl], desc))
                bad = [(p["connections"], p.get(key)) for p in pts
                       if p.get(key) is not None and (p.get("lost") or not p.get("drained", True))]
                if bad:
                    ax.scatter([x for x, _ in bad], [y for _, y in bad], marker="x", s=90, color="red", zorder=5)
    ax1.set_title("deliveries/s (hot room, one room, 128 B)")
    ax1.set_xlabel("connections")
    ax1.set_ylabel("deliveries per second (log)")
    ax1.set_yscale("log")
    ax2.set_title("trigger → delivery p99 latency")
    ax2.set_xlabel("connections")
    ax2.set_ylabel("p99 ms (log)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle("high-templar: Rust gateway vs {} (each on one core; red x: deliveries lost / not drained)".format(PY),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- Centrifugo


def centrifugo_section(results, meta, scenarios, details, md, out):
    """The Rust gateway beside Centrifugo, for the scenarios it ran."""
    cf_version = meta.get("centrifugo", "none")
    ran = [s for s in scenarios if Side(results, "centrifugo", s).ran]
    out["centrifugo"] = {"version": cf_version, "scenarios": {}}
    if not ran:
        return
    label = "{} {}".format(CF, cf_version)
    md.append("")
    md.append("## Rust gateway vs {}".format(label))
    md.append("")
    md.append("Centrifugo built from the Go module proxy (`go install github.com/centrifugal/centrifugo/v6@{}`), "
              "memory engine, `GOMAXPROCS=1`, pinned to core 0 like the gateway; the bench on core 1 speaks "
              "Centrifugo's JSON protocol (`--protocol centrifugo`: one channel per room, `key=value`) and "
              "publishes through its HTTP API (`--publish centrifugo`: `POST /api/publish`), while the Rust "
              "gateway above gets its triggers over RabbitMQ. Same rooms, same data, same checks (lost, "
              "duplicated, unexpected). \"Rust better by\" as above, against Centrifugo.".format(cf_version))
    md.append("")
    md.append("| scenario | metric | Rust | {} | Rust ÷ {} | Rust better by |".format(label, CF))
    md.append("|---|---|---:|---:|---:|---|")
    for scenario in ran:
        rust = details[scenario][0]
        cf = Side(results, "centrifugo", scenario)
        entry = {"centrifugo": cf.summary(), "headline": [], "metrics": []}
        ha, hc = headline(rust), headline(cf)
        for metric in [m for m in HEADLINE_BETTER if m in ha or m in hc]:
            better = HEADLINE_BETTER[metric]
            r, c = ha.get(metric), hc.get(metric)
            ratio, adv = ratio_cells(better, r, c)
            entry["headline"].append({"metric": metric, "better": better, "rust": r, "centrifugo": c,
                                      "rust_over_centrifugo": ratio, "rust_better_by": adv})
            md.append("| {} | {} | {} | {} | {} | {} |".format(scenario, metric, fmt(r), fmt(c), fmt(ratio),
                                                                adv_text(adv, CF)))
        for metric, better, r, c, note in detail_rows(rust, cf, CF):
            ratio, adv = ratio_cells(better, r, c)
            entry["metrics"].append({"metric": metric, "better": better, "rust": r, "centrifugo": c,
                                     "rust_over_centrifugo": ratio, "rust_better_by": adv, "note": note})
        out["centrifugo"]["scenarios"][scenario] = entry
    md.append("")
    for scenario in ran:
        cf = Side(results, "centrifugo", scenario)
        st = cf.status
        state = cf.failure() or ("correct" if cf.ok else "INCORRECT: " + "; ".join(cf.problems()[:3]))
        md.append("* {}, {}: {} ({} s{})".format(scenario, CF, esc(state), st.get("seconds", "?"),
                                                ", exit {}".format(st.get("rc")) if st.get("rc") not in (0, None) else ""))
    for scenario in ran:
        rust = details[scenario][0]
        cf = Side(results, "centrifugo", scenario)
        md.append("")
        md.append("### {}: Rust vs {}".format(scenario, CF))
        md.append("")
        md.append("| metric | Rust | {} | Rust ÷ {} | Rust better by | note |".format(label, CF))
        md.append("|---|---:|---:|---:|---|---|")
        for metric, better, r, c, note in detail_rows(rust, cf, CF):
            ratio, adv = ratio_cells(better, r, c)
            md.append("| {} | {} | {} | {} | {} | {} |".format(esc(metric), fmt(r), fmt(c), fmt(ratio),
                                                              adv_text(adv, CF), esc(note)))


def floor_section(results, meta, md, out):
    """Every side's hot run beside the floor probe of the same run."""
    floor = load_json(os.path.join(results, "floor.json"))
    out["floor"] = None
    if not floor or floor.get("tool") != "high-templar-floor":
        return
    sides = [(label, Side(results, impl, "hot")) for label, impl in
             (("Rust", "rust"), ("{} {}".format(CF, meta.get("centrifugo", "")).strip(), "centrifugo"), (PY, "python"))]
    sides = [(label, side) for label, side in sides if side.ran]
    steps = (floor.get("summary") or {}).get("steps") or []
    compared = {}
    for label, side in sides:
        compared[label] = {st.get("rate"): st for st in g(side.report, "floor", "steps") or []}
    out["floor"] = {"floor": floor.get("summary"), "ok": floor.get("ok"), "connections": floor.get("connections"),
                    "sides": {label: list(by_rate.values()) for label, by_rate in compared.items()}}
    md.append("")
    md.append("## Hot room beside the floor")
    md.append("")
    md.append("The floor probe (tests/bench/floor: one `send` per connection and round, C on raw epoll; "
              "docs/performance.md \"Floor probe\") ran with hot's shape ({} connections) just before the hot "
              "runs, its sender on core 0, its reader on core 1; correct: {}. Each cell: the side's figure, "
              "then ×(side ÷ floor). The Rust gateway and Python get their triggers over RabbitMQ, Centrifugo "
              "over its HTTP API; the floor builds each frame itself, so every server's latency includes its "
              "publish path and the floor's does not. B: the bench's core was saturated in that step (its "
              "figures may be the bench's).".format(floor.get("connections"), "yes" if floor.get("ok") else "**no**"))
    md.append("")
    head = "| triggers/s | floor deliveries/s | floor p99 ms | floor CPU µs/delivery |"
    rule = "|---:|---:|---:|---:|"
    for label, _ in sides:
        head += " {0} deliveries/s | {0} p99 ms | {0} CPU µs/delivery |".format(label)
        rule += "---:|---:|---:|"
    md.append(head)
    md.append(rule)

    def cell(v, r, bound):
        if v is None:
            return "–"
        return "{}{}{}".format(fmt(v), " (×{})".format(fmt(r)) if r is not None else "", " B" if bound else "")

    for fs in steps:
        rate = fs.get("rate")
        row = "| {} | {} | {} | {} |".format(fmt(rate), fmt(fs.get("deliveries_per_second")), fmt(fs.get("p99_ms")),
                                             fmt(fs.get("cpu_us_per_delivery")))
        for label, _ in sides:
            st = compared[label].get(rate)
            if not st:
                row += " – | – | – |"
                continue
            gw, bound = st.get("gateway") or {}, st.get("bench_bound")
            row += " {} | {} | {} |".format(
                cell(gw.get("deliveries_per_second"), st.get("deliveries_per_second_ratio"), bound),
                cell(gw.get("p99_ms"), st.get("p99_ratio"), bound),
                cell(gw.get("cpu_us_per_delivery"), st.get("cpu_per_delivery_ratio"), bound))
        md.append(row)
    for label, side in sides:
        if not compared[label]:
            md.append("")
            md.append("* {}: no comparison ({})".format(label, esc(side.failure() or "its hot run has no floor steps")))
        for note in g(side.report, "floor", "notes") or []:
            md.append("* {}: {}".format(label, esc(note)))


# ---------------------------------------------------------------- main


def main():
    results = sys.argv[1]
    meta = load_json(os.path.join(results, "meta.json")) or {}
    scenarios = meta.get("scenarios", "").split()
    patched = meta.get("python_patch_request_id", True)
    md = []
    out = {"meta": meta, "scenarios": {}, "headline": [], "protocol": None, "sweep": []}

    md.append("# Rust gateway vs Python high-templar 3.1.0")
    md.append("")
    md.append("scale {} · exchange `{}` · {} · commit {} · {} CPUs · started {}".format(
        meta.get("scale"), meta.get("exchange"), meta.get("pinning"), meta.get("git"), meta.get("cpus"),
        meta.get("started")))
    md.append("")
    md.append("Both servers: one process pinned to core 0, AMQP consumer on the same RabbitMQ, the bench's "
              "bundled backend; the bench (`--publish amqp`) on core 1. Python: `hypercorn --workers 0 "
              "ht_python_app:application` (high-templar 3.1.0 from PyPI, see python-freeze.txt){}.".format(
                  ", **with the subscribe reply patched to echo `requestId`** (the bench needs it; "
                  "nothing else changed)" if patched else ", **unpatched**"))
    md.append("")
    md.append("\"Rust better by\": how many times better the Rust figure is (higher is better for rates, "
              "lower for memory, latency, CPU); \"×N Python\" when Python's is better. Ratios of runs this "
              "small are indicative only (CPU is read in 10 ms ticks).")
    md.append("")

    # Headline
    md.append("## Summary")
    md.append("")
    md.append("| scenario | metric | Rust | {} | Rust ÷ Python | Rust better by |".format(PY))
    md.append("|---|---|---:|---:|---:|---|")
    details = {}
    for scenario in scenarios:
        rust, python = Side(results, "rust", scenario), Side(results, "python", scenario)
        reasons, blocking = python_reasons(scenario, python)
        entry = {"rust": rust.summary(), "python": python.summary(), "python_issues": reasons,
                 "python_usable": not blocking, "metrics": []}
        ha, hb = headline(rust), headline(python)
        for metric in [m for m in HEADLINE_BETTER if m in ha or m in hb]:
            better = HEADLINE_BETTER[metric]
            r, p = ha.get(metric), hb.get(metric)
            if blocking:
                p = None
            ratio, adv = ratio_cells(better, r, p)
            row = {"metric": metric, "better": better, "rust": r, "python": p, "rust_over_python": ratio,
                   "rust_better_by": adv}
            out["headline"].append(dict(row, scenario=scenario))
            flag = metric not in ("connections/s", "RSS bytes/connection", "subscribes/s")
            pcell = fmt(p) if not blocking else "n/a"
            rcell = fmt(r)
            if flag and python.incomplete_steps() and p is not None:
                pcell += " ⚠"
            if flag and rust.incomplete_steps() and r is not None:
                rcell += " ⚠"
            md.append("| {} | {} | {} | {} | {} | {} |".format(
                scenario, metric, rcell, pcell, fmt(ratio), adv_text(adv)))
        rows = detail_rows(rust, python)
        for metric, better, r, p, note in rows:
            ratio, adv = ratio_cells(better, r, p)
            entry["metrics"].append({"metric": metric, "better": better, "rust": r, "python": p,
                                     "rust_over_python": ratio, "rust_better_by": adv, "note": note})
        out["scenarios"][scenario] = entry
        details[scenario] = (rust, python, rows, reasons)
    md.append("")
    if any("⚠" in line for line in md):
        md.append("⚠: some step of that scenario lost deliveries or was not drained: step figures cover only what "
                  "arrived (see below).")
        md.append("")

    # Python problems
    md.append("## What the Python server could not do")
    md.append("")
    any_issue = False
    for scenario in scenarios:
        rust, python, _, reasons = details[scenario]
        rf = rust.failure()
        if rust.broker_lost():
            any_issue = True
            md.append("* **{}**, Rust: the gateway lost its RabbitMQ connection during the run "
                      "(logs/rust-{}.log); not comparable, run it again".format(scenario, scenario))
        if rf or (rust.report is not None and not rust.ok):
            any_issue = True
            md.append("* **{}**, Rust: {}".format(scenario, rf or "; ".join(rust.problems()[:4])))
        for r in reasons:
            any_issue = True
            md.append("* **{}**, Python: {}".format(scenario, esc(r)))
    if not any_issue:
        md.append("Nothing: every scenario ran correctly against both.")
    md.append("")

    # Details
    md.append("## Per scenario")
    for scenario in scenarios:
        rust, python, rows, reasons = details[scenario]
        md.append("")
        md.append("### {}".format(scenario))
        md.append("")
        for label, side in (("Rust", rust), (PY, python)):
            st = side.status
            state = side.failure() or ("correct" if side.ok else "INCORRECT: " + "; ".join(side.problems()[:3]))
            md.append("* {}: {} ({} s{})".format(label, esc(state), st.get("seconds", "?"),
                                                 ", exit {}".format(st.get("rc")) if st.get("rc") not in (0, None) else ""))
        md.append("")
        md.append("| metric | Rust | {} | Rust ÷ Python | Rust better by | note |".format(PY))
        md.append("|---|---:|---:|---:|---|---|")
        for metric, better, r, p, note in rows:
            ratio, adv = ratio_cells(better, r, p)
            md.append("| {} | {} | {} | {} | {} | {} |".format(esc(metric), fmt(r), fmt(p), fmt(ratio),
                                                              adv_text(adv), esc(note)))

    # Centrifugo
    centrifugo_section(results, meta, scenarios, details, md, out)

    # The floor
    if "hot" in scenarios:
        floor_section(results, meta, md, out)

    # Sweep
    points = sweep_points(results, meta)
    out["sweep"] = points
    if points:
        md.append("")
        md.append("## Hot-room sweep")
        md.append("")
        md.append("`high-templar-bench run -n N --rooms hot=1 --rates {},0 --duration {} --triggers {} "
                  "--payload-bytes 128`: a step at {}/s, then the same number of triggers as fast as the "
                  "publisher goes (burst).".format(meta.get("sweep_rate"), meta.get("sweep_duration"),
                                                   meta.get("sweep_burst"), meta.get("sweep_rate")))
        md.append("")
        try:
            plot(points, os.path.join(results, "sweep.png"), meta)
            md.append("![sweep](sweep.png)")
            md.append("")
        except Exception as e:  # noqa: BLE001
            md.append("(plot failed: {})".format(e))
            md.append("")
        md.append("| connections | step | Rust deliveries/s | Python deliveries/s | Rust p99 ms | Python p99 ms "
                  "| Rust better by (deliveries/s) | Rust better by (p99) | note |")
        md.append("|---:|---|---:|---:|---:|---:|---|---|---|")
        keyed = {}
        for p in points:
            keyed[(p["connections"], p.get("step"), p["impl"])] = p
        for n in sorted({p["connections"] for p in points}):
            fails = [p for p in points if p["connections"] == n and p.get("failure")]
            for f in fails:
                md.append("| {} | – | | | | | | | {}: {} |".format(n, f["impl"], esc(f["failure"])))
            for step in ("fixed", "burst"):
                a, b = keyed.get((n, step, "rust")), keyed.get((n, step, "python"))
                if not a and not b:
                    continue
                note = []
                for label, p in (("Rust", a), ("Python", b)):
                    if p and (p.get("lost") or not p.get("drained", True)):
                        note.append("{}: lost {}{}".format(label, p.get("lost"),
                                                           "" if p.get("drained", True) else ", not drained"))
                _, adv_d = ratio_cells(HIGHER, g(a, "deliveries_per_second"), g(b, "deliveries_per_second"))
                _, adv_l = ratio_cells(LOWER, g(a, "p99_ms"), g(b, "p99_ms"))
                md.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    n, (a or b).get("step_name"), fmt(g(a, "deliveries_per_second")),
                    fmt(g(b, "deliveries_per_second")), fmt(g(a, "p99_ms")), fmt(g(b, "p99_ms")),
                    adv_text(adv_d), adv_text(adv_l), "; ".join(note)))

    # Protocol
    prows = protocol_rows(results)
    if prows:
        out["protocol"] = [{"case": c, "rust": r, "python": p, "same": r == p} for c, r, p in prows]
        md.append("")
        md.append("## Protocol probe (unpatched 3.1.0)")
        md.append("")
        md.append("probe.py against each server, with its own backend (answers by `?token=`: ok → 200 "
                  "`allowed_rooms` [{customer:*, warehouse:*}, {hot:*}], deny → 403, down → 500, redirect → 302) "
                  "and publishing over AMQP. One connection holds subscriptions 10 = {customer:1, warehouse:2}, "
                  "\"11\" = {customer:1, warehouse:\"*\"}, 12 = {hot:0}; trigger rows list the requestIds that "
                  "got the trigger. Full frames in protocol-rust.json / protocol-python.json.")
        md.append("")
        md.append("| case | Rust | {} | same |".format(PY))
        md.append("|---|---|---|---|")
        for c, r, p in prows:
            md.append("| {} | `{}` | `{}` | {} |".format(esc(c), esc(r).replace("`", "'"), esc(p).replace("`", "'"),
                                                        "yes" if r == p else "**no**"))

    md.append("")
    md.append("Raw results: runs/<impl>-<scenario>.json (bench `--json`), .txt (bench summary), .status.json; "
              "server logs in logs/.")
    text = "\n".join(md) + "\n"
    with open(os.path.join(results, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(results, "compare.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True, default=str)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

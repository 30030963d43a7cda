"""The Dockerfile agrees with the repository and the manifests (no container runtime here, so
the build itself is not run: these check what a build depends on)."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

from tests.deploy.manifests import REPO, find, pod_spec, render

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = DOCKERFILE.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip()
            out[current] = []
        out[current].append((word, rest))
    return out


def dockerignored(path: str) -> bool:
    ignored = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_images_build_from_python_311_slim_with_pip_install():
    all_stages = stages()
    assert set(all_stages) == {"controller", "agent", "preloader"}
    assert all_stages["controller"][0] == ("FROM", "python:3.11-slim AS controller")
    assert all_stages["agent"][0] == ("FROM", "controller AS agent")
    assert any(w == "RUN" and "pip install ." in r for w, r in all_stages["controller"])


BUILD_LINE = re.compile(r"docker build --target (\S+) -t (\S+) \.")


def built_images() -> dict[str, str]:
    """Stage -> image reference, from the build commands in the Dockerfile's header comment."""
    return dict(BUILD_LINE.findall(DOCKERFILE))


def test_every_stage_has_a_build_command_naming_its_target():
    """Without --target docker builds the last stage (the preloader), so each documented
    build command names one, and docs/deploy.md gives the same commands."""
    assert set(built_images()) == set(stages())
    docs = (REPO / "docs/deploy.md").read_text()
    for target in stages():
        assert f"docker build --target {target} -t REGISTRY/" in docs, target


def test_the_built_images_are_the_ones_the_kustomization_maps():
    workloads = {
        "controller": ("Deployment", "autoscaler-controller"),
        "agent": ("DaemonSet", "autoscaler-agent"),
        "preloader": ("DaemonSet", "autoscaler-preloader"),
    }
    resources = render("base")
    for target, (kind, name) in workloads.items():
        image = pod_spec(find(resources, kind, name))["containers"][0]["image"]
        assert built_images()[target] == image, target


def test_the_preloader_image_runs_the_fastload_module_on_a_cuda_torch_base():
    preloader = stages()["preloader"]
    base = preloader[0][1].split(" AS ")[0]
    assert base.startswith("pytorch/pytorch:") and "-cuda" in base and base.endswith("-runtime")
    assert [r for w, r in preloader if w == "ENTRYPOINT"] == [
        '["python", "-m", "autoscaler.agent.fastload"]'
    ]
    assert 'if __name__ == "__main__":' in (REPO / "autoscaler/agent/fastload.py").read_text()
    # only the package's source, found through PYTHONPATH: no `pip install .` of the whole
    # dependency set (tests/deploy/test_preloader_manifest.py checks what it imports)
    copies = [r for w, r in preloader if w == "COPY"]
    assert copies == ["autoscaler /opt/autoscaler/autoscaler"]
    assert not any(w == "RUN" and "pip install" in r for w, r in preloader)
    assert any(w == "ENV" and "PYTHONPATH=/opt/autoscaler" in r.split() for w, r in preloader)


def test_the_preloader_image_default_command_parses_with_fastload():
    from autoscaler.agent.fastload import build_parser

    (cmd,) = [r for w, r in stages()["preloader"] if w == "CMD"]
    args = build_parser().parse_args(json.loads(cmd))
    assert args.command == "preload" and args.socket_dir == "/run/autoscaler/preload"
    container = pod_spec(find(render("base"), "DaemonSet", "autoscaler-preloader"))["containers"][0]
    assert build_parser().parse_args(container["args"]) == args


def test_every_copied_path_is_in_the_build_context():
    for word, rest in instructions():
        if word != "COPY":
            continue
        *sources, _dest = rest.split()
        for src in sources:
            if src == ".cache/criu-root":
                # made by scripts/install-criu.sh before the agent build (docs/deploy.md)
                assert (REPO / "scripts/install-criu.sh").is_file()
            else:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"


def test_the_entrypoint_is_the_package_console_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["autoscaler"] == "autoscaler.cli:main"
    assert 'ENTRYPOINT ["autoscaler"]' in DOCKERFILE
    for obj in render("overlays/keda"):
        if obj["kind"] == "Deployment":
            assert pod_spec(obj)["containers"][0]["command"] == ["autoscaler"]


def test_the_agent_runs_its_own_light_entry_point():
    """The node agent idles at ~37 MB through `python -m autoscaler.agent`, ~161 MB through
    the full CLI (benchmarks/agent_idle.py); the DaemonSet and the agent image use the first."""
    agent_entry = [r for w, r in stages()["agent"] if w == "ENTRYPOINT"]
    assert agent_entry == ['["python", "-m", "autoscaler.agent"]']
    assert (REPO / "autoscaler/agent/__main__.py").is_file()
    agent = find(render("overlays/keda"), "DaemonSet", "autoscaler-agent")
    assert pod_spec(agent)["containers"][0]["command"] == ["python", "-m", "autoscaler.agent"]


def test_the_image_user_is_the_one_the_manifests_run_as():
    user = next(r for w, r in stages()["controller"] if w == "USER")
    uid = int(user.split(":")[0])
    deployment = find(render("base"), "Deployment", "autoscaler-controller")
    assert pod_spec(deployment)["securityContext"]["runAsUser"] == uid


def test_the_agent_image_points_the_agent_at_its_criu():
    env = [r for w, r in stages()["agent"] if w == "ENV"]
    assert "AUTOSCALER_CRIU=/opt/criu-root/bin/criu" in env
    # the agent's CRIU lookup reads exactly this variable
    assert "AUTOSCALER_CRIU" in (REPO / "autoscaler/agent/criu.py").read_text()


def test_the_default_model_ships_in_the_image():
    copies = [r for w, r in stages()["controller"] if w == "COPY"]
    assert "models/default /opt/autoscaler/models/default" in copies
    assert (REPO / "models/default/model-card.json").is_file()

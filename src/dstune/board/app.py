"""The board's web app: server-rendered pages and a small JSON API on FastAPI, the stack of `dstune serve`.

Safety (the board starts processes, and a recipe can turn on trust_remote_code): every request must name an allowed
Host (DNS rebinding) and, when it carries one, an allowed Origin (CSRF); every route needs the board's token, from
the cookie the printed URL sets for pages, and from the X-Board-Token header for anything that changes state, which
a page of another site can neither read nor send.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from ..config import apply_overrides, read_recipe_file
from ..errors import DstuneError
from ..preflight import check_recipe
from ..provenance import load_recipe_or_manifest, recipe_source
from . import runs as run_files
from .jobs import Jobs
from .schema import cli_command, form_fields, overrides_from_form

HERE = Path(__file__).parent
TOKEN_COOKIE = "dstune_board_token"
TOKEN_HEADER = "x-board-token"
SAFE_METHODS = ("GET", "HEAD")
# The board's pages run only its own script; inline styles are the templates' few.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
               "frame-ancestors 'self'")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass
class BoardOptions:
    """The command line of `dstune board`."""

    host: str = "127.0.0.1"
    port: int = 7860
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    root: Path = field(default_factory=Path.cwd)  # where runs are started (recipes' relative paths resolve here)
    runs_dir: str = "runs"
    recipes_dir: str = "recipes"
    allowed_hosts: tuple[str, ...] = ()  # more Host names to accept (a reverse proxy's), besides the local ones

    @property
    def runs_path(self) -> Path:
        return (self.root / self.runs_dir).resolve()


class BoardError(Exception):
    """A request the board refuses: status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(options: BoardOptions) -> FastAPI:
    """The board: pages /recipe, /runs, /runs/NAME, /report/NAME, /compare, /chat, and the /api routes they call."""
    app = FastAPI(title="dstune board", docs_url=None, redoc_url=None, openapi_url=None)
    jobs = Jobs(options.runs_path / ".board" / "jobs")
    pages = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    hosts = {h.lower() for h in (*LOCAL_HOSTS, *options.allowed_hosts)}
    if options.host not in ("0.0.0.0", "::", ""):
        hosts.add(options.host.lower())

    def host_name(value: str) -> str:
        value = value.strip().lower()
        if value.startswith("["):
            return value[: value.find("]") + 1]
        return value.rsplit(":", 1)[0] if value.count(":") == 1 else value

    def origin_ok(origin: str) -> bool:
        scheme, _, rest = origin.partition("://")
        return scheme in ("http", "https") and host_name(rest) in hosts and rest.rsplit(":", 1)[-1] == str(options.port)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if host_name(request.headers.get("host", "")) not in hosts:
            return _refuse("this Host is not the board's (DNS rebinding?)")
        origin = request.headers.get("origin")
        if origin is not None and not origin_ok(origin):
            return _refuse("a page of another origin may not use the board")
        given = request.query_params.get("token")
        if request.method in SAFE_METHODS and given is not None:
            if not secrets.compare_digest(given, options.token):
                return _refuse("wrong token")
            # The printed URL's token becomes a cookie that pages send (never a header another site can forge).
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(TOKEN_COOKIE, options.token, httponly=True, samesite="strict")
            return response
        if request.method in SAFE_METHODS:
            token = request.cookies.get(TOKEN_COOKIE) or request.headers.get(TOKEN_HEADER, "")
        else:
            token = request.headers.get(TOKEN_HEADER, "")
        if not secrets.compare_digest(token, options.token):
            return _refuse("open the board with the URL it printed at start (it carries the token)")
        return await call_next(request)

    @app.exception_handler(BoardError)
    async def board_error(_request: Request, error: BoardError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(DstuneError)
    async def dstune_error(_request: Request, error: DstuneError):
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception):
        # One line for the page to show; the board's terminal gets the traceback from uvicorn's log as well.
        return JSONResponse({"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"},
                            status_code=500)

    def page(name: str, **context) -> HTMLResponse:
        html = pages.get_template(name).render(token=options.token, active=name.split(".")[0], **context)
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY})

    # -- runs and their jobs --------------------------------------------------------------------------------------

    # Each request reads the job folders once (`every = jobs.all()`) and hands that snapshot to these helpers: a run
    # page polls its status every second, and each read checks /proc and the logs of the jobs that failed.

    def run_dirs(every: list[dict]) -> dict[str, Path]:
        found = {}
        if options.runs_path.is_dir():
            for path in sorted(options.runs_path.iterdir()):
                if path.is_dir() and not path.name.startswith("."):
                    found[path.name] = path
        for job in every:  # a recipe with its own output_dir still shows
            found.setdefault(job["run"], Path(job["run_dir"]))
        return found

    def run_dir(name: str, every: list[dict]) -> Path:
        path = run_dirs(every).get(name)
        if path is None:
            raise BoardError(404, f"no run named {name!r} under {options.runs_path}")
        return path

    def jobs_of(every: list[dict], name: str, kind: str) -> list[dict]:
        """The run's jobs of one kind, newest first."""
        return [j for j in every if j["run"] == name and j["kind"] == kind]

    def run_summary(name: str, path: Path, every: list[dict]) -> dict:
        state = run_files.run_state(path, jobs_of(every, name, "run"))
        report = run_files.read_report(path)
        metrics = {m: v.get("tuned") for m, v in ((report or {}).get("metrics") or {}).items()}
        return {"name": name, **state, "metrics": metrics,
                "reports": [k for k, f in run_files.REPORTS.items() if (path / f).is_file()]}

    def source_of(name: str, path: Path, every: list[dict]) -> str:
        """What a job of the run reads its recipe from: the manifest the run wrote, else its newest launch's base."""
        manifest = run_files.run_recipe_source(path)
        if manifest is not None:
            return _relative(manifest, options.root)
        launched = jobs_of(every, name, "run")
        if launched:
            return launched[0]["argv"][1]
        raise BoardError(409, f"run {name!r} has no manifest yet (its dataset was never built)")

    # -- recipe ---------------------------------------------------------------------------------------------------

    def bases() -> list[str]:
        found = []
        recipes = options.root / options.recipes_dir
        if recipes.is_dir():
            found += [_relative(p, options.root) for p in sorted(recipes.glob("*.y*ml"))]
        for name, path in run_dirs(jobs.all()).items():
            if (path / "report.json").is_file():
                found.append(_relative(path / "report.json", options.root))
        return found

    def base_path(base: str) -> Path:
        path = (options.root / base).resolve()
        if not path.is_file() or not path.is_relative_to(options.root.resolve()):
            raise BoardError(400, f"{base}: no such recipe under {options.root}")
        return path

    def resolve(base: str, values: dict) -> dict:
        """The form's values as CLI overrides on `base`, resolved by the CLI's own loader."""
        path = base_path(base)
        fields = form_fields(_load_quietly(path))
        overrides = overrides_from_form(fields, values)
        try:
            recipe = load_recipe_or_manifest(str(path), overrides)
            check_recipe(recipe)  # what `dstune run` checks before any stage: model source, data files, checks
        except DstuneError as exc:
            return {"ok": False, "error": str(exc).replace(str(path), base), "overrides": overrides,
                    "command": cli_command("run", base, overrides)}
        return {"ok": True, "overrides": overrides, "command": cli_command("run", base, overrides),
                "recipe": recipe.model_dump(mode="json"), "run": recipe.name,
                "run_dir": str((options.root / recipe.run_dir).resolve())}

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/")
    async def home():
        return RedirectResponse("/runs", status_code=303)

    @app.get("/recipe", response_class=HTMLResponse)
    async def recipe_page(base: str | None = None):
        choices = bases()
        base = base or (choices[0] if choices else None)
        fields, error = [], None
        if base:
            try:
                fields = form_fields(_load_quietly(base_path(base)))
            except (DstuneError, BoardError) as exc:
                error = getattr(exc, "message", str(exc))
        sections: dict[str, list] = {}
        for f in fields:
            sections.setdefault(f.section, []).append(f)
        return page("recipe.html", bases=choices, base=base, sections=sections, error=error)

    async def resolved_body(request: Request, must_be_valid: bool = True) -> tuple[dict, str, dict]:
        """The request's JSON, its base recipe, and the form's values resolved on it (400: the one-line error)."""
        body = await _json(request)
        base = str(body.get("base", ""))
        resolved = await run_in_threadpool(resolve, base, dict(body.get("values") or {}))
        if must_be_valid and not resolved["ok"]:
            raise BoardError(400, resolved["error"])
        return body, base, resolved

    @app.post("/api/recipe/check")
    async def check(request: Request):
        return (await resolved_body(request, must_be_valid=False))[2]

    @app.post("/api/recipe/save")
    async def save(request: Request):
        body, base, resolved = await resolved_body(request)
        target = str(body.get("path") or "").strip()
        out = (options.root / target).resolve()
        if not target.endswith((".yaml", ".yml")) or not out.is_relative_to(options.root.resolve()):
            raise BoardError(400, f"{target or '(empty)'}: save as a .yaml file under {options.root}")
        if out.exists() and not body.get("overwrite"):
            raise BoardError(409, f"{target} exists; tick overwrite to replace it")
        raw = recipe_source(str(base_path(base)))  # a manifest's recipe, else the file's path
        raw = apply_overrides(raw if isinstance(raw, dict) else read_recipe_file(raw), resolved["overrides"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return {"saved": _relative(out, options.root), "command": cli_command("run", _relative(out, options.root), [])}

    # -- runs -----------------------------------------------------------------------------------------------------

    @app.post("/api/runs/launch")
    async def launch(request: Request):
        _, base, resolved = await resolved_body(request)
        name = resolved["run"]
        if any(j["state"] == "running" for j in jobs_of(jobs.all(), name, "run")):
            raise BoardError(409, f"run {name!r} is already running")
        job = jobs.start("run", name, Path(resolved["run_dir"]), ["run", base, *resolved["overrides"]], options.root)
        return {"run": name, "job": job["id"], "command": resolved["command"]}

    @app.get("/runs", response_class=HTMLResponse)
    async def runs_page():
        every = jobs.all()
        return page("runs.html", runs=[run_summary(n, p, every) for n, p in run_dirs(every).items()])

    @app.get("/api/runs")
    async def runs_api():
        every = jobs.all()
        return {"runs": [run_summary(n, p, every) for n, p in run_dirs(every).items()]}

    @app.get("/runs/{name}", response_class=HTMLResponse)
    async def run_page(name: str):
        every = jobs.all()
        path = run_dir(name, every)
        from ..export.formats import EXPORTS

        specs = [f"{fmt}:{q}" for fmt in sorted(EXPORTS) for q in EXPORTS[fmt].quants]
        return page("run.html", run=run_summary(name, path, every), specs=specs)

    @app.get("/api/runs/{name}/status")
    async def run_status(name: str, tail: int = 30):
        every = jobs.all()
        path = run_dir(name, every)
        summary = run_summary(name, path, every)
        exports = []
        report = run_files.read_report(path) or {}
        records = {f"{e['format']}:{e['quant']}": e for e in report.get("exports") or []}
        for job in jobs_of(every, name, "export"):
            spec = job.get("spec")
            exports.append({"job": job["id"], "spec": spec, "state": job["state"], "error": job.get("error"),
                            "record": records.get(spec) if job["state"] != "running" else None})
        # The exports the run itself made (export.formats), which no board job stands for.
        shown = {e["spec"] for e in exports}
        exports += [{"job": None, "spec": spec, "state": "done (in the run)", "error": None, "record": record}
                    for spec, record in records.items() if spec not in shown]
        newest = next((j for j in jobs_of(every, name, "run")), None)
        log = jobs.log(newest["id"], tail) if newest else ""
        command = shlex.join(["dstune", *newest["argv"]]) if newest else None
        return {**summary, "log": log, "exports": exports, "command": command}

    @app.get("/api/runs/{name}/events")
    async def run_events(name: str, request: Request):
        """Server-sent events: the run's step and eval events as events.jsonl grows (never stdout)."""
        path = run_dir(name, jobs.all())

        async def stream():
            offset = 0
            idle = 0.0
            while not await request.is_disconnected():
                events, offset = run_files.read_curves(path, offset)
                if events:
                    idle = 0.0
                    yield f"data: {json.dumps(events)}\n\n"
                else:
                    idle += 0.25
                    if idle >= 15:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                await asyncio.sleep(0.25)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/runs/{name}/stop")
    async def stop(name: str):
        running = [j for j in jobs_of(jobs.all(), name, "run") if j["state"] == "running"]
        if not running or not jobs.stop(running[0]["id"]):
            raise BoardError(409, f"run {name!r} is not running")
        return {"stopping": running[0]["id"]}

    @app.post("/api/runs/{name}/resume")
    async def resume(name: str):
        every = jobs.all()
        path = run_dir(name, every)
        launched = jobs_of(every, name, "run")
        if any(j["state"] == "running" for j in launched):
            raise BoardError(409, f"run {name!r} is already running")
        if not run_files.run_state(path, launched)["resumable"]:
            raise BoardError(409, f"run {name!r} has no checkpoint to resume from")
        argv = launched[0]["argv"] if launched else ["run", source_of(name, path, every)]
        argv = [a for a in argv if a != "--resume"] + ["--resume"]
        job = jobs.start("run", name, path, argv, options.root)
        return {"run": name, "job": job["id"]}

    @app.post("/api/runs/{name}/export")
    async def export(name: str, request: Request):
        body = await _json(request)
        spec = str(body.get("spec", ""))
        fmt, sep, quant = spec.partition(":")
        from ..export.formats import get_format

        if not sep:
            raise BoardError(400, f"{spec!r}: an export is format:quant, e.g. onnx:int8")
        get_format(fmt, quant)
        every = jobs.all()
        path = run_dir(name, every)
        if not (path / "merged" / "config.json").is_file():
            raise BoardError(409, f"run {name!r} has no merged model to export")
        argv = ["export", source_of(name, path, every), "--format", fmt, "--quant", quant]
        job = jobs.start("export", name, path, argv, options.root, spec=spec)
        return {"job": job["id"], "spec": spec}

    # -- reports --------------------------------------------------------------------------------------------------

    @app.get("/report/{name}", response_class=HTMLResponse)
    async def report_page(name: str):
        every = jobs.all()
        return page("report.html", run=run_summary(name, run_dir(name, every), every))

    @app.get("/files/{name}/{which}")
    async def report_file(name: str, which: str):
        if which not in run_files.REPORTS:
            raise BoardError(404, f"no report {which!r}")
        path = run_dir(name, jobs.all()) / run_files.REPORTS[which]
        if not path.is_file():
            raise BoardError(404, f"run {name!r} has no {run_files.REPORTS[which]}")
        # The reports are dstune's own self-contained pages: no script runs in them.
        return FileResponse(path, media_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'none'; img-src data:; "
                                                                "style-src 'unsafe-inline'"})

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(request: Request):
        names = request.query_params.getlist("run")
        every = jobs.all()
        reports = {}
        for name in names:
            report = run_files.read_report(run_dir(name, every))
            if report is not None:
                reports[name] = report
        done = [n for n, p in run_dirs(every).items() if (p / "report.json").is_file()]
        return page("compare.html", table=run_files.comparison(reports) if reports else None, done=done,
                    chosen=names)

    # -- chat -----------------------------------------------------------------------------------------------------

    def serve_job(name: str, every: list[dict]) -> dict | None:
        live = [j for j in jobs_of(every, name, "serve") if j["state"] == "running"]
        return live[0] if live else None

    @app.get("/chat", response_class=HTMLResponse)
    async def chat_page(run: str | None = None):
        servable = [n for n, p in run_dirs(jobs.all()).items() if (p / "adapter").is_dir()]
        return page("chat.html", runs=servable, chosen=run or (servable[0] if servable else None))

    @app.post("/api/chat/{name}/start")
    async def chat_start(name: str):
        every = jobs.all()
        path = run_dir(name, every)
        job = serve_job(name, every)
        if job is None:
            if not (path / "adapter").is_dir():
                raise BoardError(409, f"run {name!r} has no adapter yet")
            port, key = _free_port(), secrets.token_urlsafe(18)
            adapter = _relative(path / "adapter", options.root)
            argv = ["serve", source_of(name, path, every), "--adapter", f"{name}={adapter}", "--port", str(port),
                    "--served-model-name", "base"]
            job = jobs.start("serve", name, path, argv, options.root, port=port, env={"DSTUNE_API_KEY": key})
        return await run_in_threadpool(_serve_state, job)

    @app.get("/api/chat/{name}")
    async def chat_state(name: str):
        every = jobs.all()
        job = serve_job(name, every)
        if job is None:
            stopped = jobs_of(every, name, "serve")
            return {"state": "stopped", "error": stopped[0].get("error") if stopped else None}
        return await run_in_threadpool(_serve_state, job)

    @app.post("/api/chat/{name}")
    async def chat(name: str, request: Request):
        body = await _json(request)
        prompt = str(body.get("prompt") or "").strip()
        if not prompt:
            raise BoardError(400, "prompt: empty")
        max_tokens = body.get("max_tokens", 64)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
            raise BoardError(400, f"max_tokens: a whole number from 1 to 4096 (got {max_tokens!r})")
        job = serve_job(name, jobs.all())
        if job is None:
            raise BoardError(409, f"no server for run {name!r}; start it first")
        state = await run_in_threadpool(_serve_state, job)
        if state["state"] != "ready":
            raise BoardError(409, f"the server of run {name!r} is {state['state']}")
        answers = await asyncio.gather(*(run_in_threadpool(_ask, job, model, prompt, max_tokens)
                                         for model in state["models"]))
        return {"answers": answers}

    @app.post("/api/chat/{name}/stop")
    async def chat_stop(name: str):
        job = serve_job(name, jobs.all())
        if job is None or not jobs.stop(job["id"]):
            raise BoardError(409, f"no server is running for run {name!r}")
        return {"stopping": job["id"]}

    return app


def _refuse(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=403)


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BoardError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BoardError(400, "the request body must be a JSON object")
    return body


def _relative(path: Path, root: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _load_quietly(path: Path) -> dict:
    """The base recipe resolved (its defaults filled in), for the form's initial values."""
    return load_recipe_or_manifest(str(path)).model_dump(mode="json")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _call(job: dict, method: str, route: str, payload: dict | None = None, timeout: float = 120.0):
    request = urllib.request.Request(
        f"http://127.0.0.1:{job['port']}{route}", method=method,
        data=None if payload is None else json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {job['env']['DSTUNE_API_KEY']}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _serve_state(job: dict) -> dict:
    """starting (the model loads), ready (with the model names it serves), or the job's end."""
    if job["state"] != "running":
        return {"state": job["state"], "error": job.get("error")}
    try:
        models = _call(job, "GET", "/v1/models", timeout=2.0)
    except (urllib.error.URLError, OSError, ValueError):
        return {"state": "starting", "since": time.time() - job["started"]}
    return {"state": "ready", "models": [m["id"] for m in models["data"]]}


def _ask(job: dict, model: str, prompt: str, max_tokens: int) -> dict:
    try:
        answer = _call(job, "POST", "/v1/chat/completions",
                       {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                        "max_tokens": max_tokens})
    except urllib.error.HTTPError as exc:
        return {"model": model, "error": f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"}
    except (urllib.error.URLError, OSError) as exc:
        return {"model": model, "error": str(exc)}
    return {"model": model, "content": answer["choices"][0]["message"]["content"]}

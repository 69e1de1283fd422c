"""InfiniteTalk on Modal: one GPU class behind an HTTPS endpoint, on the same service core and settings as
the Cog predictor and the RunPod worker.

    modal deploy modal_app.py        # builds the image, creates the Volume, prints the endpoint's URL

README "Modal" shows a call. What this file defines, every choice read and checked when it is imported
(:meth:`infinitetalk.settings.Settings.from_env`, :class:`~infinitetalk.settings.ModalSettings`): a bad
or unknown ``INFINITETALK_*`` variable stops ``modal deploy`` with one line, before anything is built.

* ``image``: the Python version, system packages (ffmpeg) and environment of ``cog.yaml``, torch from
  PyTorch's index for ``cog.yaml``'s CUDA, then ``requirements-gpu.txt`` (the pins are read from those
  files, not repeated here), a C compiler (Triton builds its launchers with one when torch.compile runs
  on CUDA, ``INFINITETALK_COMPILE=1``), and the ``infinitetalk`` package;
* a Volume (``INFINITETALK_MODAL_VOLUME``, created when missing) mounted at ``/weights``, with
  ``INFINITETALK_WEIGHTS=/weights/infinitetalk-weights``: the first container fetches the weights into it
  (``service.load_pipeline`` -> ``download.ensure_weights``, about 113 GB) and commits them; later
  containers find them there;
* ``InfiniteTalk``: ``gpu=INFINITETALK_MODAL_GPU``; ``@modal.enter`` loads the pipeline once per container
  with ``service.load_pipeline(Settings.from_env())``, as the other front ends do; ``@modal.asgi_app``
  serves ``POST /`` with :class:`infinitetalk.web.WebEndpoint` (the RunPod worker's JSON request, the
  MP4 or a JSON error back), behind Modal's proxy auth (``Modal-Key`` / ``Modal-Secret`` headers). One
  request per container at a time; Modal queues the others and starts containers up to
  ``INFINITETALK_MODAL_MAX_CONTAINERS``.

The other ``INFINITETALK_*`` settings of the deploying shell (memory mode, bucket, input limits, ...)
are passed into the containers (as a Modal secret made from them, :func:`~infinitetalk.settings.server_env`).

Importing this file needs neither Modal credentials nor the network (``tests/test_modal_app.py``). NOT RUN
ON MODAL BY US: no image was built and no container started (our machines have no Modal account); the
endpoint's code runs in the tests, locally, with tiny weights.
"""

# No `from __future__ import annotations`: FastAPI reads the route's `request: Request` annotation at runtime.
from dataclasses import dataclass
from pathlib import Path

import modal

from infinitetalk.settings import ENV_WEIGHTS, Settings, SettingsError, server_env

ROOT = Path(__file__).resolve().parent
#: Where the Volume is mounted in the containers, and the weights folder in it.
VOLUME_MOUNT = "/weights"
WEIGHTS = f"{VOLUME_MOUNT}/infinitetalk-weights"
#: Triton compiles a small C launcher per kernel (torch.compile on CUDA); debian_slim has no compiler.
COMPILER_PACKAGES = ("build-essential",)

try:
    SETTINGS = Settings.from_env()
except SettingsError as exc:  # one line for `modal deploy`, not a traceback
    raise SystemExit(f"error: {exc}") from None


@dataclass(frozen=True)
class ImageSpec:
    """What the image installs, read from cog.yaml and its requirements file (:func:`image_spec`)."""

    python_version: str
    apt_packages: tuple[str, ...]
    torch: str  # the torch requirement line of the requirements file, as written there ("torch==<version>")
    torch_index_url: str
    requirements: Path
    env: dict[str, str]


def image_spec(root: Path = ROOT) -> ImageSpec:
    """The GPU image of ``cog.yaml`` (its ``build`` and ``environment``), for Modal's builder."""
    import yaml

    cfg = yaml.safe_load((root / "cog.yaml").read_text())
    build = cfg["build"]
    requirements = root / build["python_requirements"]
    pins = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()]
    torch = [pin for pin in pins if pin.split("==", 1)[0].strip().lower() == "torch"]
    if len(torch) != 1:
        raise ValueError(f"{requirements.name} must pin torch once, found {torch}")
    env = dict(item.split("=", 1) for item in cfg.get("environment") or [])
    return ImageSpec(
        python_version=str(build["python_version"]),
        apt_packages=(*build.get("system_packages", ()), *COMPILER_PACKAGES),
        torch=torch[0],
        # cog installs torch+cuXYZ for build.cuda "X.Y.Z"; the same wheels come from PyTorch's index.
        torch_index_url="https://download.pytorch.org/whl/cu" + "".join(str(build["cuda"]).split(".")[:2]),
        requirements=requirements,
        env={**env, "PYTHONUNBUFFERED": "1", ENV_WEIGHTS: WEIGHTS},
    )


def build_image(spec: ImageSpec) -> modal.Image:
    return (
        modal.Image.debian_slim(python_version=spec.python_version)
        .apt_install(*spec.apt_packages)
        # torch first from the CUDA index; the torch==X line of the requirements file is then satisfied.
        .pip_install(spec.torch, index_url=spec.torch_index_url)
        .pip_install_from_requirements(str(spec.requirements))
        .env(spec.env)
        .add_local_python_source("infinitetalk")
    )


# cog.yaml and the requirements file exist where `modal deploy` runs, not in the containers (which
# import this file again but run on the image built from it).
image = build_image(image_spec()) if modal.is_local() else modal.Image.debian_slim()
app = modal.App(SETTINGS.modal.app_name, image=image)
weights_volume = modal.Volume.from_name(SETTINGS.modal.volume, create_if_missing=True)

#: The options of the GPU class, from the settings (tests check them).
CLASS_OPTIONS = {
    "gpu": SETTINGS.modal.gpu,
    "volumes": {VOLUME_MOUNT: weights_volume},
    "env": server_env(),
    "timeout": SETTINGS.modal.timeout_s,  # one request (Modal's web proxy answers 303 after 150 s: follow it)
    "startup_timeout": SETTINGS.modal.timeout_s,  # the first start downloads the weights
    "max_containers": SETTINGS.modal.max_containers,
}


def web_app(endpoint):
    """A FastAPI app serving ``endpoint`` (an :class:`infinitetalk.web.WebEndpoint`) at ``POST /``.

    FastAPI comes with ``runpod`` (requirements-gpu.txt pins runpod, which requires ``fastapi[all]``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    class ClosingFileResponse(FileResponse):
        """The MP4, then the job's folder removed: also when the client went away mid-transfer."""

        def __init__(self, reply) -> None:
            super().__init__(reply.path, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
            self.reply = reply

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.reply.close()

    api = FastAPI(title="InfiniteTalk", docs_url=None, redoc_url=None, openapi_url=None)

    @api.post("/")
    async def generate(request: Request):
        reply = await run_in_threadpool(endpoint.handle, await request.body())
        if reply.path is not None:
            return ClosingFileResponse(reply)
        reply.close()
        return JSONResponse(reply.json, status_code=reply.status, headers=reply.headers)

    return api


@app.cls(**CLASS_OPTIONS)
class InfiniteTalk:
    @modal.enter()
    def load(self) -> None:
        """Once per container: check the settings, open the bucket (if any), load the models (fetching the
        weights into the Volume first when it lacks them, then committing them, and the compile cache setup
        writes after a cold compile, for the next containers)."""
        from infinitetalk import service
        from infinitetalk.compilation import COMPILE_CACHE_DIR
        from infinitetalk.download import plan_weights
        from infinitetalk.storage import open_storage
        from infinitetalk.web import WebEndpoint

        settings = Settings.from_env()
        service.configure_logging()
        storage = open_storage(settings.storage, check=settings.check_bucket)
        fetching = not plan_weights(settings.weights).complete
        caches = settings.weights / COMPILE_CACHE_DIR
        before = sorted(caches.glob("*.bin")) if caches.is_dir() else []
        pipe = service.load_pipeline(settings)
        new_cache = caches.is_dir() and sorted(caches.glob("*.bin")) != before  # saved after a cold compile
        if (fetching or new_cache) and not modal.is_local():
            weights_volume.commit()
        self.endpoint = WebEndpoint(pipe, settings.worker, storage)

    @modal.asgi_app(requires_proxy_auth=True)
    def web(self):
        return web_app(self.endpoint)

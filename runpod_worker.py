"""RunPod Serverless entry point: ``python runpod_worker.py`` (the CMD of Dockerfile.runpod).

A thin file: the worker lives in ``infinitetalk/runpod_worker.py`` over the same service core as the
Cog predictor (``infinitetalk/service.py``). Locally, the SDK's development API server:
``python runpod_worker.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000``.
"""

from infinitetalk.runpod_worker import main

if __name__ == "__main__":
    main()

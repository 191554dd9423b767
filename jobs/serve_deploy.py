"""Ray job entry point: deploy the detection endpoint (`vitad serve --detach`) on the cluster the
job was submitted to; the Serve app outlives the job.

    ray job submit --address http://127.0.0.1:DASHBOARD --working-dir . -- \
        python jobs/serve_deploy.py MODEL_DIR [--port 8000] [--shards N] ...
"""

import sys

from _entry import run

if __name__ == "__main__":
    if "--detach" not in sys.argv:
        sys.argv.append("--detach")
    run("serve")

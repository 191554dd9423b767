"""Ray job entry point: `vitad fit` on the cluster the job was submitted to.

    ray job submit --address http://127.0.0.1:DASHBOARD --working-dir . -- \
        python jobs/fit.py ARGS...   (the arguments of `vitad fit`)
"""

from _entry import run

if __name__ == "__main__":
    run("fit")

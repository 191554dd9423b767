"""Ray job entry point: `vitad score` on the cluster the job was submitted to.

    ray job submit --address http://127.0.0.1:DASHBOARD --working-dir . -- \
        python jobs/score.py ARGS...   (the arguments of `vitad score`)
"""

from _entry import run

if __name__ == "__main__":
    run("score")

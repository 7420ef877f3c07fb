import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny test models gain nothing from 2 threads

"""The engine: embed -> fit -> score on Ray (Data, tasks), Ray start-up, progress, jobs."""

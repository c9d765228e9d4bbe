"""The application around the core: configuration, command line, explain and batch jobs, engines,
reports, pictures, the demo and malloc tuning. The core (multisal/*.py, multisal/methods) never
imports it."""

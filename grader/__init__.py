"""The course's grader: finds exercises, runs their graded suites in isolation, reports results."""

__version__ = "1.0.0"

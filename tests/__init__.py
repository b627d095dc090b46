"""The test suite, a package: shared settings in :mod:`tests.settings`, the fake Hub in
:mod:`tests.hub_server`, the stored-output cases in :mod:`tests.regression_cases`."""

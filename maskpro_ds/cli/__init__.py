"""Every command line of maskpro_ds; each module's ``main`` is a console entry point (see pyproject.toml).

Commands hold no logic beyond argument parsing and error reporting: user errors print one line
naming the option or file and exit with status 2.
"""

"""Every command-line front end of megapre, one module per command (`main(argv) -> exit code`).
Library modules hold no argparse and no main(); tools/ and the console scripts call these."""

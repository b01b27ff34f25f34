from sublora_cli.cli import main

main()

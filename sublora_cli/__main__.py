from sublora_cli.cli.app import main

main()

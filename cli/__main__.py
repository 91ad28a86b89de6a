from hbbus.cli.main import main

main()

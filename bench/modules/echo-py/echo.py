import tessera


class Echo(tessera.Task):
    def echo(self, x):
        return x

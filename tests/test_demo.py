def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    from train.demo import main

    main(["--steps", "12", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.split("diffusion loss: ")[1].split(" over")[0].split(" -> "))
    assert last < first
    assert "reload bit-exact: True" in out
    assert (tmp_path / "idadapter-demo.safetensors").is_file()

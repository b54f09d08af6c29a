"""Fill a <mask> with a trained model: `ds-mlm-fill-mask MODEL_DIR "text with <mask>"`.

A thin front for transformers' `fill-mask` pipeline, used by the demo to show what the model learned. MODEL_DIR is
an export (`{output_dir}/roberta_thai`), which holds the model and its tokenizer.
"""

import argparse
import os

from ds_mlm.errors import UserError, cli


def fill_mask(model_dir: str, text: str, top_k: int = 5) -> list[dict]:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir} is not a saved model (no config.json): give an export such as OUTPUT_DIR/roberta_thai")
    from transformers import pipeline

    from ds_mlm.tokenization import load_tokenizer

    tokenizer = load_tokenizer(model_dir, "auto")
    if text.count(tokenizer.mask_token) != 1:
        raise UserError(f"the text has {text.count(tokenizer.mask_token)} {tokenizer.mask_token}: put exactly one "
                        f"{tokenizer.mask_token} where a word should be guessed")
    fill = pipeline("fill-mask", model=model_dir, tokenizer=tokenizer, device="cpu", top_k=top_k)
    return fill(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds-mlm-fill-mask", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="an exported model directory (OUTPUT_DIR/roberta_thai)")
    parser.add_argument("text", nargs="+", help="text with one <mask>; several texts may be given")
    parser.add_argument("--top_k", type=int, default=5, help="how many guesses to print per text")
    args = parser.parse_args(argv)
    for text in args.text:
        print(text)
        for guess in fill_mask(args.model_dir, text, args.top_k):
            print(f"  {guess['score']:.3f}  {guess['token_str']!r}  ->  {guess['sequence']}")
    return 0


cli_main = cli(main)

if __name__ == "__main__":
    cli_main()

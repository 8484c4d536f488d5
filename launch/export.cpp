// `brigade export`: a checkpoint as a Hugging Face directory or a GGUF file.
#include <filesystem>
#include <iostream>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/bpe.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "model/gguf_export.h"
#include "model/hf.h"

namespace brigade::launch {
namespace fs = std::filesystem;
namespace {

// The tokenizer files beside the weights: the source tokenizer.json (and its
// tokenizer_config.json) copied as they are, or the byte tokenizer written as a
// byte-level BPE with the ChatML template.
void write_tokenizer_files(const fs::path& source, const data::BpeTokenizer& tokenizer, const fs::path& dir) {
  if (source.empty()) {
    tokenizer.save(dir, data::chat_template_jinja("chatml"));
    return;
  }
  const fs::path config = source.parent_path() / "tokenizer_config.json";
  if (fs::exists(config)) fs::copy_file(config, dir / "tokenizer_config.json");
  else tokenizer.save(dir);  // tokenizer_config.json with the special-token roles
  fs::copy_file(source, dir / "tokenizer.json", fs::copy_options::overwrite_existing);
}

// A tokenizer whose convention starts sequences with BOS (data::Tokenizer::add_bos:
// brigade's byte tokenizer and its own BPEs, Llama) exports a post-processor that puts
// the BOS token first, so transformers users feed the model what it was trained on
// (tokenizer(text) and apply_chat_template(tokenize=True)); one without (Qwen) keeps
// its own.
void prepend_bos(const fs::path& tokenizer_json, const data::BpeTokenizer& tokenizer) {
  const auto bos = tokenizer.special_id(data::kBosToken);
  if (!bos || !tokenizer.add_bos()) return;
  const std::string token = tokenizer.tokens()[static_cast<size_t>(*bos)];
  auto root = nlohmann::ordered_json::parse(read_file(tokenizer_json));
  const nlohmann::ordered_json special = {{"SpecialToken", {{"id", token}, {"type_id", 0}}}};
  root["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {special, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"pair", {special, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, special,
                {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
      {"special_tokens", {{token, {{"id", token}, {"ids", {*bos}}, {"tokens", {token}}}}}}};
  write_file_atomic(tokenizer_json, root.dump(2) + "\n");
}

// A fresh temporary path beside `out`, renamed over it at the end: a failed export
// leaves nothing that looks finished.
fs::path staging_path(const fs::path& out) {
  fs::path tmp = out;
  tmp += ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  return tmp;
}

}  // namespace

int export_command(const ExportArgs& args) {
  BRIGADE_CHECK(args.format == "hf" || args.format == "gguf", "--format must be hf or gguf, got '", args.format, "'");
  BRIGADE_CHECK(!args.out.empty(), "--out is required");
  BRIGADE_CHECK(!fs::exists(args.out) || (fs::is_directory(args.out) && fs::is_empty(args.out)), "--out ",
                args.out.string(), " already exists (brigade export does not overwrite)");
  if (args.out.has_parent_path()) fs::create_directories(args.out.parent_path());
  LoadedModel loaded = load_model(args.checkpoint, args.overrides);
  const auto& options = loaded.model->options();
  const model::HfFamily family = model::family_of(options);
  const std::string& tok_name = loaded.recipe.data.tokenizer;
  // A .gguf tokenizer (model.init_from a GGUF file) is rebuilt from its vocabulary;
  // a tokenizer.json is copied as it is.
  const bool from_gguf = fs::path(tok_name).extension() == ".gguf";
  const fs::path tok_source = tok_name == "byte" || from_gguf ? fs::path() : data::find_tokenizer_json(tok_name);
  BRIGADE_CHECK(tok_name == "byte" || from_gguf || !tok_source.empty(), "the checkpoint's tokenizer ", tok_name,
                " no longer exists");
  BRIGADE_CHECK(!from_gguf || fs::exists(tok_name), "the checkpoint's tokenizer ", tok_name, " no longer exists");
  const std::unique_ptr<data::Tokenizer> vocabulary =
      tok_name == "byte" ? std::make_unique<data::BpeTokenizer>(data::BpeTokenizer::from_byte_tokenizer())
      : from_gguf        ? recipes::make_tokenizer(tok_name)
                         : std::make_unique<data::BpeTokenizer>(data::BpeTokenizer::load(tok_source));
  BRIGADE_CHECK(vocabulary->vocab_size() <= options.vocab_size, "the tokenizer has ", vocabulary->vocab_size(),
                " tokens but the model only ", options.vocab_size, " embedding rows");
  const std::string name = args.name.empty() ? loaded.recipe.name : args.name;
  const fs::path tmp = staging_path(args.out);
  try {
    if (args.format == "hf") {
      BRIGADE_CHECK(args.quant.empty(), "--quant is for --format gguf; Hugging Face exports take --dtype");
      const auto* bpe = dynamic_cast<const data::BpeTokenizer*>(vocabulary.get());
      BRIGADE_CHECK(bpe != nullptr, "the checkpoint's tokenizer ", tok_name,
                    " is a SentencePiece vocabulary, which brigade does not write as a Hugging Face tokenizer.json; "
                    "export --format gguf keeps it");
      const data::BpeTokenizer& tokenizer = *bpe;
      fs::create_directories(tmp);
      model::save_hf_checkpoint(*loaded.model, tmp, args.dtype, static_cast<uint64_t>(args.max_shard_mb) << 20,
                                tokenizer.bos_id(), tokenizer.eos_id());
      write_tokenizer_files(tok_source, tokenizer, tmp);
      prepend_bos(tmp / "tokenizer.json", tokenizer);
      if (fs::exists(args.out)) fs::remove(args.out);  // the empty directory checked above
    } else {
      const auto quant = model::parse_gguf_quant(args.quant.empty() ? "f16" : args.quant);
      model::export_gguf(loaded.model, family, *vocabulary, quant, tmp, name);
    }
    fs::rename(tmp, args.out);
    fsync_dir(args.out.has_parent_path() ? args.out.parent_path() : fs::path("."));
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
  std::cout << "exported " << model::family_name(family) << " model '" << name << "' ("
            << loaded.model->parameter_count().total << " parameters) as "
            << (args.format == "hf" ? "a Hugging Face directory" : "GGUF") << ": " << args.out.string() << "\n";
  return 0;
}

}  // namespace brigade::launch

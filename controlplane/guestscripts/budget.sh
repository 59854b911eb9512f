. /.avm/limits; left=$AVM_OUTPUT_LIMIT
find "$@" -type f 2>/dev/null | sort | while IFS= read -r f; do
  s=$(stat -c %s "$f") || continue
  if [ "$s" -gt "$left" ]; then truncate -s "$left" "$f" && echo "$s ${f#./}"; left=0
  else left=$((left - s)); fi
done

# Apache Kafka broker jars for the test suite (no broker exists in Debian or on PyPI).
# Fetches org.apache.kafka:kafka_2.13 with its runtime dependencies from Maven Central into
# $VMITRACE_CACHE/kafka/<version>/libs; tests/support/kafka.py runs kafka.Kafka from there.
# Sourced by setup.sh; idempotent (a stamp file marks a complete download of this recipe).
kafka_recipe=2  # bump when the pom below changes
VMITRACE_KAFKA_VERSION=${VMITRACE_KAFKA_VERSION:-4.3.1}
kafka_dir="$VMITRACE_CACHE/kafka/$VMITRACE_KAFKA_VERSION"
if [ ! -f "$kafka_dir/.complete-$kafka_recipe" ]; then
  log "fetching Kafka $VMITRACE_KAFKA_VERSION jars from Maven Central"
  rm -rf "$kafka_dir"; mkdir -p "$kafka_dir"
  # log4j-core + the slf4j 1.x binding give the broker a working logger (Kafka logs through
  # slf4j 1.7 to log4j2, as its own distribution does).
  cat > "$kafka_dir/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>vmitrace</groupId><artifactId>kafka-broker-jars</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>$VMITRACE_KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>2.24.3</version></dependency>
  </dependencies>
</project>
POM
  mvn -q -B -f "$kafka_dir/pom.xml" -Dmaven.repo.local="$VMITRACE_CACHE/kafka/m2" \
    org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$kafka_dir/libs" >&2
  ls "$kafka_dir"/libs/kafka_2.13-"$VMITRACE_KAFKA_VERSION".jar >/dev/null
  touch "$kafka_dir/.complete-$kafka_recipe"
fi
